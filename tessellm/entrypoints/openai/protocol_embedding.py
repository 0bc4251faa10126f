"""POST /v1/embeddings bodies: OpenAI's, plus vLLM's extras (chat-style ``messages`` input,
``truncate_prompt_tokens``, ``normalize``, ``add_special_tokens``). Unknown fields are a 400
naming the field, as everywhere (protocol.py)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field

from tessellm.entrypoints.openai.protocol import ChatMessage, _Request
from tessellm.entrypoints.openai.protocol_responses import UsageInfo


class _EmbeddingFields(_Request):
    model: Optional[str] = None  # None: the served model
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 bytes
    dimensions: Optional[int] = Field(None, ge=1)  # Matryoshka: the first d values, renormalized
    user: Optional[str] = None  # accepted; no effect
    # vLLM extras
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)  # keep the first k tokens (-1: as many as fit)
    normalize: Optional[bool] = None  # None: the model's pooler config (true by default)
    request_id: Optional[str] = Field(None, min_length=1, max_length=256)  # the response id's tail


class EmbeddingCompletionRequest(_EmbeddingFields):
    input: Union[str, list[str], list[int], list[list[int]]]
    add_special_tokens: bool = True  # BOS etc. added to a text input


class PoolingChatFields(_Request):
    """vLLM's chat-style input to a pooling endpoint (/v1/embeddings, /classify): the messages
    through the chat template, as one prompt."""

    messages: list[ChatMessage]
    add_generation_prompt: bool = False  # vLLM's default for embeddings: no assistant turn opened
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_special_tokens: bool = False  # the template places the special tokens


class EmbeddingChatRequest(_EmbeddingFields, PoolingChatFields):
    """vLLM's chat-style embedding input."""


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: Union[list[float], str]  # str: base64 of float32 bytes


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo
