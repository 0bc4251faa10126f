"""Request and response bodies of ``POST /v1/responses`` (OpenAI's Responses API), field for
field as the ``openai`` package's ``openai.types.responses`` reads them.

The request forbids unknown fields (a typo is a 400 naming it). ``input`` items are kept as
plain dicts here and checked one by one in ``input.py``, so an error names ``input[i]`` and the
item's own field. Fields tessellm does not implement are declared so that their *use* is
refused by name (``UNSUPPORTED``); their neutral value is accepted.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextFormat(_Strict):
    """``text.format``: plain text, any JSON object, or JSON valid against ``schema``."""

    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    description: Optional[str] = None
    # "schema" shadows a pydantic BaseModel attribute: stored as json_schema, sent as "schema".
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class TextConfig(_Strict):
    format: Optional[TextFormat] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None  # only "medium" (or null) is accepted


class ReasoningConfig(_Strict):
    # the chat request's reasoning_effort: given to the chat template (gpt-oss's writes
    # "Reasoning: high"; it takes low / medium / high only), with enable_thinking = effort != "none"
    effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]] = None
    summary: Optional[Literal["auto", "concise", "detailed"]] = None  # accepted; no summaries are written
    generate_summary: Optional[Literal["auto", "concise", "detailed"]] = None  # its older name


class FunctionTool(_Strict):
    """A tool in the Responses shape: name, description and parameters at the top level."""

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ResponsesRequest(_Strict):
    model: Optional[str] = None  # None: the served model
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None  # a system message before the input
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    tools: Optional[list[dict[str, Any]]] = None  # checked one by one (input.py): FunctionTool
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    reasoning: Optional[ReasoningConfig] = None
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None  # include_obfuscation: accepted; no effect
    store: Optional[bool] = None  # false: not kept; else kept with --responses-store-size (store.py)
    metadata: Optional[dict[str, str]] = None  # echoed in the response
    user: Optional[str] = None  # accepted; no effect
    safety_identifier: Optional[str] = None  # accepted; no effect
    prompt_cache_key: Optional[str] = None  # accepted; no effect (the prefix cache is automatic)
    include: Optional[list[str]] = None  # see INCLUDE_ACCEPTED
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)  # with include message.output_text.logprobs
    truncation: Optional[Literal["auto", "disabled"]] = None  # "disabled" only
    service_tier: Optional[str] = None  # "auto" / "default" only
    previous_response_id: Optional[str] = None  # the stored response this one continues (store.py)
    # vLLM's extras, as at /v1/chat/completions (checked there: VLLM_EXTRAS)
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    ignore_eos: bool = False
    request_id: Optional[str] = None
    cache_salt: Optional[str] = None
    structured_outputs: Optional[dict[str, Any]] = None  # e.g. {"disable_any_whitespace": true}
    priority: int = 0  # lower is served first; non-zero needs --scheduling-policy priority
    # unsupported (refused unless neutral)
    conversation: Optional[Any] = None
    background: Optional[bool] = None
    max_tool_calls: Optional[int] = None
    prompt: Optional[Any] = None
    prompt_cache_retention: Optional[str] = None


# passed as they are to the chat request, whose validation and messages name them the same way
VLLM_EXTRAS = ("top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "seed", "stop",
               "ignore_eos", "request_id", "cache_salt", "structured_outputs", "priority")

# field -> (values that mean "not used", how to do without it)
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "conversation": ((None,), "conversation objects are not kept; use previous_response_id "
                     "(--responses-store-size) or send the whole conversation in input"),
    "background": ((None, False), "responses run in the foreground; use stream: true for long ones"),
    "max_tool_calls": ((None,), "remove it"),
    "prompt": ((None,), "stored prompt templates do not exist here; send instructions and input"),
    "prompt_cache_retention": ((None, "in_memory"), "the prefix cache lives in memory; remove it"),
    "truncation": ((None, "disabled"), "send an input that fits the model's context"),
    "service_tier": ((None, "auto", "default"), "remove it"),
}

# include values: logprobs of the message's tokens; reasoning.encrypted_content has no effect
# (reasoning is returned as text, never encrypted)
LOGPROBS = "message.output_text.logprobs"
INCLUDE_ACCEPTED = {"reasoning.encrypted_content", LOGPROBS}


# -- the response --------------------------------------------------------------------------

class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)
    logprobs: list = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class MessageItem(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    content: list[OutputText] = Field(default_factory=list)


class ReasoningItem(BaseModel):
    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list = Field(default_factory=list)  # no summaries: the reasoning itself is in content
    content: list[ReasoningText] = Field(default_factory=list)
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class FunctionCallItem(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str = ""
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = Union[MessageItem, ReasoningItem, FunctionCallItem]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    cache_write_tokens: int = 0  # OpenAI's explicit cache writes: none here (the prefix cache is automatic)


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    error: Optional[dict] = None
    incomplete_details: Optional[IncompleteDetails] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: Optional[str] = None
    reasoning: Optional[dict] = None
    store: bool = False
    temperature: Optional[float] = None
    text: Optional[dict] = None
    tool_choice: Union[str, dict] = "auto"
    tools: list[dict] = Field(default_factory=list)
    top_p: Optional[float] = None
    top_logprobs: Optional[int] = None
    truncation: Literal["disabled"] = "disabled"
    usage: Optional[ResponseUsage] = None
    user: Optional[str] = None
    metadata: dict[str, str] = Field(default_factory=dict)
