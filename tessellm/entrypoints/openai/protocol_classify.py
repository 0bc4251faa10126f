"""Bodies of vLLM's classification, scoring and reranking endpoints (``/classify``, ``/score``,
``/rerank``; docs/pooling.md). Unknown fields are a 400 naming the field, as everywhere.
``use_activation`` is vLLM's name; ``softmax`` and ``activation`` are its deprecated spellings."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field

from tessellm.entrypoints.openai.protocol import _Request
from tessellm.entrypoints.openai.protocol_embedding import PoolingChatFields
from tessellm.entrypoints.openai.protocol_responses import UsageInfo


class _ActivationFields(_Request):
    model: Optional[str] = None  # None: the served model
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)  # keep the first k tokens (-1: as many as fit)
    use_activation: Optional[bool] = None  # softmax / sigmoid (None: the pooler config's, true)
    softmax: Optional[bool] = None  # vLLM's deprecated spelling of use_activation
    activation: Optional[bool] = None  # likewise
    user: Optional[str] = None  # accepted; no effect
    request_id: Optional[str] = Field(None, min_length=1, max_length=256)  # the response id's tail

    def activation_wanted(self) -> Optional[bool]:
        """vLLM's precedence: softmax, then activation, then use_activation."""
        for value in (self.softmax, self.activation, self.use_activation):
            if value is not None:
                return value
        return None


class ClassificationRequest(_ActivationFields):
    input: Union[str, list[str], list[int], list[list[int]]]
    add_special_tokens: bool = True  # BOS etc. added to a text input


class ClassificationChatRequest(_ActivationFields, PoolingChatFields):
    """vLLM's chat-style classification input."""


class ClassificationData(BaseModel):
    index: int
    label: Optional[str]  # id2label of the most probable class
    probs: list[float]
    num_classes: int


class ClassificationResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: UsageInfo


class ScoreRequest(_ActivationFields):
    text_1: Union[str, list[str]]  # one query for every text_2, or one per text_2
    text_2: Union[str, list[str]]


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: UsageInfo


class RerankRequest(_ActivationFields):
    """Jina / Cohere style, as vLLM serves it at /rerank, /v1/rerank and /v2/rerank."""

    query: str
    documents: list[str]
    top_n: int = Field(0, ge=0)  # the best n, most relevant first (0: all of them)
    return_documents: bool = True  # Cohere's switch; vLLM always returns them


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int  # the document's position in the request
    document: Optional[RerankDocument] = None
    relevance_score: float


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]
