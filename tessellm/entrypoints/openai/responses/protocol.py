"""Request and response bodies of ``POST /v1/responses`` (OpenAI's Responses API), field for
field as the ``openai`` package's ``openai.types.responses`` reads them.

The request forbids unknown fields (a typo is a 400 naming it). ``input`` items are kept as
plain dicts here and checked one by one in ``input.py``, so an error names ``input[i]`` and the
item's own field. Fields tessellm does not implement are declared so that their *use* is
refused by name (``UNSUPPORTED``); their neutral value is accepted.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_serializer


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
    # "auto": a prompt over the context loses its start (vLLM's truncate_prompt_tokens -1), room
    # kept for max_output_tokens; "disabled" (the default): it is a 400
    truncation: Optional[Literal["auto", "disabled"]] = None
    # echoed; no effect (one tier here), as vLLM
    service_tier: Optional[Literal["auto", "default", "flex", "scale", "priority"]] = None
    max_tool_calls: Optional[int] = Field(None, ge=0)  # echoed; no effect: no built-in tools run here
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
    logit_bias: Optional[dict[str, float]] = None
    skip_special_tokens: Optional[bool] = None
    include_stop_str_in_output: Optional[bool] = None
    include_reasoning: Optional[bool] = None  # false: no reasoning item (it is still generated)
    chat_template_kwargs: Optional[dict[str, Any]] = None
    vllm_xargs: Optional[dict[str, Any]] = None
    kv_transfer_params: Optional[Any] = None  # a KV connector's (docs/kv_transfer.md); echoed back
    ec_transfer_params: Optional[Any] = None
    media_io_kwargs: Optional[Any] = None
    mm_processor_kwargs: Optional[Any] = None
    session_id: Optional[str] = None  # accepted; no effect
    background: Optional[bool] = None  # true: answered at once, run on (needs the store; serving.py)
    # unsupported (refused unless neutral)
    conversation: Optional[Any] = None
    prompt: Optional[Any] = None
    prompt_cache_retention: Optional[str] = None
    enable_response_messages: Optional[bool] = None  # vLLM's: the raw messages in the response
    previous_input_messages: Optional[Any] = None  # vLLM's (harmony messages of earlier turns)
    previous_response: Optional[Any] = None  # vLLM's stateless multi-turn (harmony state in it)
    thinking_token_budget: Optional[Any] = None  # chat's and completions' field; vLLM's responses has none


# passed as they are to the chat request, whose validation and messages name them the same way
VLLM_EXTRAS = ("top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "seed", "stop",
               "ignore_eos", "request_id", "cache_salt", "structured_outputs", "priority", "logit_bias",
               "skip_special_tokens", "include_stop_str_in_output", "include_reasoning", "chat_template_kwargs",
               "vllm_xargs", "kv_transfer_params", "ec_transfer_params", "media_io_kwargs", "mm_processor_kwargs",
               "session_id")

# field -> (values that mean "not used", how to do without it)
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "conversation": ((None,), "conversation objects are not kept; use previous_response_id "
                     "(--responses-store-size) or send the whole conversation in input"),
    "prompt": ((None,), "stored prompt templates do not exist here; send instructions and input"),
    "prompt_cache_retention": ((None, "in_memory"), "the prefix cache lives in memory; remove it"),
    "enable_response_messages": ((None, False), "the response's output items are its messages; POST the "
                                 "same input to /tokenize (as chat messages) to see the prompt's tokens"),
    "previous_input_messages": ((None, []), "send the earlier turns as input items, or continue a "
                                "stored response with previous_response_id"),
    "previous_response": ((None,), "send its output items (and your function_call_output items) in "
                          "input, or continue a stored response with previous_response_id"),
    "thinking_token_budget": ((None, -1), "vLLM's /v1/responses takes no thinking budget (its chat and "
                              "completions requests do): send the conversation to /v1/chat/completions with "
                              "thinking_token_budget, or use reasoning.effort here"),
}

# include values: logprobs of the message's tokens; the others (vLLM's list) have no effect:
# reasoning is returned as text, never encrypted; no built-in tool runs here; input images are
# not echoed
LOGPROBS = "message.output_text.logprobs"
INCLUDE_ACCEPTED = {"reasoning.encrypted_content", LOGPROBS, "code_interpreter_call.outputs",
                    "computer_call_output.output.image_url", "file_search_call.results",
                    "message.input_image.image_url"}


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
    # vLLM's per-turn figures of its built-in tool loop; one turn here, for which vLLM's own
    # non-harmony path sends them empty, as here
    input_tokens_per_turn: list[int] = Field(default_factory=list)
    cached_tokens_per_turn: list[int] = Field(default_factory=list)


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0
    tool_output_tokens: int = 0  # vLLM's: tokens of built-in tools' output (none run here)
    output_tokens_per_turn: list[int] = Field(default_factory=list)
    tool_output_tokens_per_turn: list[int] = Field(default_factory=list)


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    """The response; vLLM's extras (``presence_penalty``, ``frequency_penalty`` as sampled,
    ``kv_transfer_params``) are sent only when set."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "in_progress", "incomplete", "queued", "cancelled"]
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
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: Optional[ResponseUsage] = None
    user: Optional[str] = None
    metadata: dict[str, str] = Field(default_factory=dict)
    background: bool = False
    service_tier: str = "auto"
    max_tool_calls: Optional[int] = None
    prompt: Optional[dict] = None
    presence_penalty: Optional[float] = None  # vLLM's: as sampled
    frequency_penalty: Optional[float] = None
    kv_transfer_params: Optional[dict] = None  # vLLM's: a KV producer's params for the decode engine

    @model_serializer(mode="wrap")
    def _drop_unasked(self, handler):
        data = handler(self)
        if data.get("kv_transfer_params") is None:
            data.pop("kv_transfer_params", None)
        return data
