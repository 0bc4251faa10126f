"""POST /pooling bodies, vLLM's: ``input`` (or chat ``messages``) as /v1/embeddings takes it,
``task`` (``embed``, ``classify``, ``token_embed``, ``token_classify``; None: what the model
does), and the params of either kind of model. Unknown fields are a 400 naming the field."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field

from tessellm.entrypoints.openai.protocol_classify import _ActivationFields
from tessellm.entrypoints.openai.protocol_embedding import PoolingChatFields
from tessellm.entrypoints.openai.protocol_responses import UsageInfo

PoolingTaskName = Literal["embed", "classify", "token_embed", "token_classify"]


class _PoolingFields(_ActivationFields):
    task: Optional[PoolingTaskName] = None  # None: embed or classify, as the model does
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 bytes
    dimensions: Optional[int] = Field(None, ge=1)  # embed tasks: the first d values, renormalized
    normalize: Optional[bool] = None  # embed tasks; None: the pooler config's (true by default)


class PoolingCompletionRequest(_PoolingFields):
    input: Union[str, list[str], list[int], list[list[int]]]
    add_special_tokens: bool = True  # BOS etc. added to a text input


class PoolingChatRequest(_PoolingFields, PoolingChatFields):
    """vLLM's chat-style pooling input: the messages through the chat template, one prompt."""


class PoolingResponseData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    # embed / classify: one vector; token_*: one row per prompt token; base64: the float32
    # bytes of either, rows one after another
    data: Union[list[list[float]], list[float], str]


class PoolingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingResponseData]
    usage: UsageInfo
