"""Request bodies of the OpenAI API, field for field, plus vLLM's extras (responses:
protocol_responses.py).

Requests forbid unknown fields (a typo or an unsupported feature is a 400 naming the field, never
silently ignored). Fields of the OpenAI API that tessellm does not implement yet are declared
here so their *use* can be refused by name (see ``UNSUPPORTED``); sending their neutral value
(null, false, "auto") is accepted.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from tessellm.entrypoints.openai.protocol_responses import ToolCall, UsageInfo


_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1  # what the engine core's msgpack carries


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: with include_usage, usage in every chunk

    def usage_now(self, prompt_tokens: int, completion_tokens: int) -> Optional["UsageInfo"]:
        """A chunk's usage: only with include_usage and continuous_usage_stats (as vLLM); with
        include_usage alone chunks carry ``"usage": null``, without it no usage key at all."""
        if not (self.include_usage and self.continuous_usage_stats):
            return None
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions (OpenAI, then vLLM extras)."""

    model: Optional[str] = None  # None: the served model
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    n: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = Field(None, ge=_INT64_MIN, le=_INT64_MAX)  # past 64 bits: a 400, never a 500
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0)  # <= 2: SamplingParams' check (vLLM's message)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    user: Optional[str] = None  # accepted; no effect
    # vLLM extras
    top_k: Optional[int] = Field(None, ge=-1, le=_INT64_MAX)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # top-k logprobs per prompt token (not streamed); -1: the whole vocabulary (vLLM)
    prompt_logprobs: Optional[int] = Field(None, ge=-1)
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)  # keep this many prompt tokens (-1: context)
    truncation_side: Optional[Literal["left", "right"]] = None  # left (default) keeps the last ones
    return_tokens_as_token_ids: Optional[bool] = None  # logprobs' tokens as "token_id:{id}"
    return_token_ids: Optional[bool] = None  # token_ids (and prompt_token_ids) in the response
    request_id: Optional[str] = Field(None, min_length=1, max_length=256)  # the response id's tail
    session_id: Optional[str] = None  # accepted; no effect
    stream_interval: Optional[int] = Field(None, ge=1)  # accepted; tessellm streams every step
    # vLLM's render-endpoint options, which its generation endpoints ignore: accepted, no effect
    return_token_offsets: Optional[bool] = None
    return_mm_kwargs: bool = True
    cache_salt: Optional[str] = None  # prefix-cache blocks are shared only within one salt
    allowed_token_ids: Optional[list[int]] = None  # only these ids may be sampled
    bad_words: Optional[list[str]] = None  # words never generated (SamplingParams.bad_words)
    use_beam_search: bool = False  # n is the beam width (openai/beam_search.py)
    length_penalty: Optional[float] = None  # beam search only (None: 1.0)
    # lower is served first; non-zero needs --scheduling-policy priority (core/request_queue.py)
    priority: int = Field(0, ge=_INT64_MIN, le=_INT64_MAX)
    # vLLM's: at most this many thinking tokens, then the reasoning end marker is forced
    # (SamplingParams.thinking_token_budget; -1 or null: no cap; docs/reasoning.md)
    thinking_token_budget: Optional[int] = None
    # vLLM's: merged into SamplingParams.extra_args, for custom extensions
    vllm_xargs: Optional[dict[str, Union[str, int, float, list[Union[str, int, float]]]]] = None
    # vLLM's: the logprobs of exactly these ids (and the sampled token's) at every generated
    # position, in place of the top k; needs logprobs (completions: a number, any; chat: true)
    logprob_token_ids: Optional[list[int]] = None
    # vLLM's RepetitionDetectionParams as an object: {"max_pattern_size", "min_pattern_size",
    # "min_count"}; stops the output with finish_reason "repetition" (core/repetition.py)
    repetition_detection: Optional[dict[str, Any]] = None
    # vLLM extras accepted only at their neutral value (UNSUPPORTED)
    spaces_between_special_tokens: bool = True
    watermarking: Optional[bool] = None
    routed_experts_prompt_start: int = 0  # tessellm returns no routed experts
    kv_transfer_params: Optional[Any] = None  # a KV connector's (SamplingParams.kv_transfer_params)
    ec_transfer_params: Optional[Any] = None
    logits_processors: Optional[Any] = None
    guided_whitespace_pattern: Optional[str] = None
    structural_tag: Optional[str] = None  # vLLM's older field (response_format structural_tag now)
    # vLLM structured output (docs/structured_output.md): one constraint at most.
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None  # older vLLM names
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None  # accepted; xgrammar is the only backend


class CompletionRequest(_SamplingFields):
    # Optional only where prompt_embeds is given instead (serving_completion checks).
    prompt: Optional[Union[str, list[str], list[int], list[list[int]]]] = None
    max_tokens: Optional[int] = Field(None, ge=0)  # 0 only with echo: score the prompt (OpenAI, vLLM)
    best_of: Optional[int] = Field(None, ge=1)  # only best_of == n (no ranking) is accepted
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0)
    add_special_tokens: bool = True  # vLLM: BOS etc. added to a text prompt
    suffix: Optional[str] = None  # unsupported
    response_format: Optional[ResponseFormat] = None  # vLLM extra here (as at chat)
    # vLLM's: base64 of torch.save(tensor [tokens, hidden]), or a list of them (one prompt
    # each); needs --enable-prompt-embeds (tessellm/core/prompt_embeds.py)
    prompt_embeds: Optional[Union[str, list[str]]] = None

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) back, nothing generated."""
        return self.echo and self.max_tokens == 0


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # other part types are refused by name

    type: str
    text: Optional[str] = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None  # role "tool": the call this result answers
    # an assistant's earlier thinking (a response's message sent back); the template sees both names
    reasoning: Optional[str] = None
    reasoning_content: Optional[str] = None
    # unsupported
    function_call: Optional[Any] = None
    refusal: Optional[str] = None
    audio: Optional[Any] = None
    annotations: Optional[Any] = None  # accepted (echoed back by SDK users); no effect


class JsonSchemaFormat(_Request):
    name: Optional[str] = None
    description: Optional[str] = None
    # "schema" shadows a pydantic BaseModel attribute: stored as json_schema, sent as "schema".
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: Optional[JsonSchemaFormat] = None
    # type "structural_tag" (vLLM): the tag itself, in either of vLLM's forms.
    structures: Optional[list[dict[str, Any]]] = None
    triggers: Optional[list[str]] = None
    format: Optional[dict[str, Any]] = None


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=-1)  # -1: the whole vocabulary (vLLM)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    add_generation_prompt: bool = True  # vLLM extras
    continue_final_message: bool = False  # the last (assistant) message is continued, not closed
    chat_template_kwargs: Optional[dict[str, Any]] = None  # extra template variables
    include_reasoning: bool = True  # false: no reasoning in the response (--reasoning-parser)
    # for the chat template (gpt-oss's writes "Reasoning: high" into its system message)
    # (vLLM's values; unless chat_template_kwargs set enable_thinking, the template also gets
    # enable_thinking = reasoning_effort != "none", as vLLM: sampling.reasoning_template_kwargs)
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]] = None
    add_special_tokens: bool = False  # true: the tokenizer's BOS etc. added to the template's text
    echo: bool = False  # vLLM's: the last message's text first, when the reply continues it
    # vLLM extras accepted only at their neutral value (CHAT_UNSUPPORTED)
    documents: Optional[Any] = None
    chat_template: Optional[str] = None
    media_io_kwargs: Optional[Any] = None
    mm_processor_kwargs: Optional[dict[str, Any]] = None  # the images' processor settings (Qwen2-VL's min/max_pixels)
    return_prompt_text: Optional[bool] = None
    # accepted with no effect
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None  # true is refused (nothing is stored)
    service_tier: Optional[str] = None  # "auto" / "default" only
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    # unsupported
    functions: Optional[Any] = None
    function_call: Optional[Any] = None
    audio: Optional[Any] = None
    modalities: Optional[Any] = None
    prediction: Optional[Any] = None
    verbosity: Optional[Any] = None
    web_search_options: Optional[Any] = None


# field -> values that mean "not used" (accepted); anything else is refused with a 400
UNSUPPORTED: dict[str, tuple] = {
    "suffix": (None, ""),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
    # vLLM extras
    "spaces_between_special_tokens": (True,),
    "watermarking": (None, False),
    "ec_transfer_params": (None,),
    "logits_processors": (None, []),
    "guided_whitespace_pattern": (None,),
    "structural_tag": (None,),
    "routed_experts_prompt_start": (0,),
}

# what to do instead, in the refusal of an UNSUPPORTED field
UNSUPPORTED_FIX: dict[str, str] = {
    "logits_processors": "per-request processors are not supported (nor in vLLM v1): start the server "
                         "with --logits-processors module:Class and select it per request with "
                         "vllm_xargs (docs/logits_processors.md), or constrain sampling with "
                         "logit_bias, allowed_token_ids, bad_words or structured outputs",
    "guided_whitespace_pattern": "send structured_outputs: {\"json\": ..., \"disable_any_whitespace\": "
                                 "true} for JSON without optional whitespace",
    "structural_tag": "send response_format: {\"type\": \"structural_tag\", ...}",
    "spaces_between_special_tokens": "special tokens are decoded as the tokenizer joins them; use "
                                     "skip_special_tokens",
    "routed_experts_prompt_start": "tessellm does not return routed experts",
    "return_prompt_text": "POST the same messages to /tokenize with return_token_strs: true to see "
                          "the rendered prompt",
}

# chat only (the same names mean something else, or are supported, at /v1/completions)
CHAT_UNSUPPORTED: dict[str, tuple] = {
    "chat_template": (None,),  # vLLM too refuses it unless --trust-request-chat-template
    "media_io_kwargs": (None,),
    "return_prompt_text": (None, False),
}


# -- tokenizer endpoints (vLLM's shapes) ----------------------------------------------------

class TokenizeCompletionRequest(_Request):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_special_tokens: bool = False  # as at /v1/chat/completions
    tools: Optional[list[ChatTool]] = None  # rendered by the template, as at /v1/chat/completions
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(_Request):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


CompletionRequest.model_rebuild()  # ResponseFormat is defined after it
