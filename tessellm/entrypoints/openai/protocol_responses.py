"""Response bodies of the OpenAI API (and vLLM's extra fields), field for field.

Optional vLLM extras (``prompt_logprobs``, ``token_ids``, ``prompt_token_ids``) are left out of
the JSON unless the request asked for them, so a plain OpenAI client sees OpenAI's shapes.
"""

from __future__ import annotations

import time
from typing import Literal, Optional, Union

from pydantic import BaseModel, Field, model_serializer


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # --enable-prompt-tokens-details (vLLM's); left out of the JSON when not asked
    prompt_tokens_details: Optional[PromptTokensDetails] = None

    @model_serializer(mode="wrap")
    def _without_unasked_details(self, handler):
        data = handler(self)
        if isinstance(data, dict) and data.get("prompt_tokens_details") is None:
            data.pop("prompt_tokens_details", None)
        return data


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob: one token's entry in ``prompt_logprobs``."""

    logprob: float
    rank: Optional[int] = None  # 1 = most likely
    decoded_token: Optional[str] = None


# vLLM's shape: per prompt token, None for the first, else token id -> its logprob (the prompt's
# own token plus the top-k).
PromptLogprobs = list[Optional[dict[int, PromptLogprob]]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[Literal["stop", "length", "repetition"]] = None
    stop_reason: Optional[Union[int, str]] = None  # vLLM: the stop string or token id (None: EOS, length)
    # vLLM extras, only when asked for (this choice is also a stream chunk's)
    prompt_logprobs: Optional[PromptLogprobs] = None  # request field prompt_logprobs
    prompt_token_ids: Optional[list[int]] = None  # return_token_ids (a stream's first chunk)
    token_ids: Optional[list[int]] = None  # return_token_ids (a stream's: the new ones)

    @model_serializer(mode="wrap")
    def _drop_unasked(self, handler):
        return _drop_none(handler(self), ("prompt_logprobs", "prompt_token_ids", "token_ids"))


def _drop_none(data: dict, names: tuple) -> dict:
    for name in names:
        if data.get(name) is None:
            data.pop(name, None)
    return data


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None
    system_fingerprint: Optional[str] = None
    # vLLM's: a KV producer's params for the decode engine (a do_remote_decode request's
    # response; docs/kv_transfer.md); no key otherwise
    kv_transfer_params: Optional[dict] = None

    @model_serializer(mode="wrap")
    def _drop_unasked(self, handler):
        return _drop_none(handler(self), ("kv_transfer_params",))


class ChatLogProbTop(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogProb(ChatLogProbTop):
    top_logprobs: list[ChatLogProbTop] = Field(default_factory=list)


class ChatChoiceLogProbs(BaseModel):
    content: Optional[list[ChatLogProb]] = None
    refusal: Optional[list[ChatLogProb]] = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"  # --response-role
    content: Optional[str] = None
    refusal: Optional[str] = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    # --reasoning-parser: the thinking, under vLLM's name today and its earlier one (same text)
    reasoning: Optional[str] = None
    reasoning_content: Optional[str] = None

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler):
        """No tool_calls key without a call (OpenAI, vLLM): clients test for its presence; no
        reasoning keys without reasoning."""
        data = _drop_none(handler(self), ("reasoning", "reasoning_content"))
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatChoiceLogProbs] = None
    finish_reason: Optional[Literal["stop", "length", "tool_calls", "repetition"]] = None
    stop_reason: Optional[Union[int, str]] = None  # vLLM: the stop string or token id
    token_ids: Optional[list[int]] = None  # vLLM's return_token_ids

    @model_serializer(mode="wrap")
    def _drop_unasked(self, handler):
        return _drop_none(handler(self), ("token_ids",))


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Optional[UsageInfo] = None
    system_fingerprint: Optional[str] = None
    prompt_logprobs: Optional[PromptLogprobs] = None  # vLLM extra: here, not in the choice (as vLLM)
    prompt_token_ids: Optional[list[int]] = None  # vLLM's return_token_ids
    kv_transfer_params: Optional[dict] = None  # as CompletionResponse's

    @model_serializer(mode="wrap")
    def _drop_unasked(self, handler):
        return _drop_none(handler(self), ("prompt_token_ids", "kv_transfer_params"))


class DeltaMessage(BaseModel):
    """A stream chunk's delta: only the fields that changed are sent."""

    role: Optional[str] = None  # the first chunk's: "assistant" (--response-role)
    content: Optional[str] = None
    reasoning: Optional[str] = None  # --reasoning-parser: new thinking text (as in the message)
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list["DeltaToolCall"]] = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: the first piece of call ``index`` carries its id, type
    and name; later pieces append to ``function.arguments``."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatChoiceLogProbs] = None
    finish_reason: Optional[Literal["stop", "length", "tool_calls", "repetition"]] = None
    stop_reason: Optional[Union[int, str]] = None
    token_ids: Optional[list[int]] = None  # return_token_ids: this chunk's new tokens

    @model_serializer(mode="wrap")
    def _drop_unasked(self, handler):
        return _drop_none(handler(self), ("token_ids",))


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None
    system_fingerprint: Optional[str] = None
    prompt_token_ids: Optional[list[int]] = None  # return_token_ids: on the first chunk

    @model_serializer(mode="wrap")
    def _drop_unasked(self, handler):
        return _drop_none(handler(self), ("prompt_token_ids",))


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "tessellm"
    root: Optional[str] = None  # tessellm: where the weights came from
    max_model_len: Optional[int] = None  # tessellm: context length
    vocab_size: Optional[int] = None  # tessellm: for random-token benchmarks
    parent: Optional[str] = None  # a LoRA adapter's base model (None for the base model)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None  # OpenAI's names; vLLM's 500 for a failed generation


class ErrorResponse(BaseModel):
    error: ErrorInfo



DeltaMessage.model_rebuild()  # DeltaToolCall is defined after it
