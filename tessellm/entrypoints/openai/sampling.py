"""From an OpenAI request to SamplingParams: refuse what is unsupported or over a limit.

Order of checks: unknown model (404), unsupported fields, server limits, then the values
themselves (SamplingParams' own validation). Every refusal names the field.
"""

from __future__ import annotations

import re
from typing import Optional, Union

from pydantic import BaseModel

from tessellm.core.input_processor import check_priority
from tessellm.core.sampling_params import RequestOutputKind, SamplingParams
from tessellm.entrypoints.openai.errors import OpenAIError, bad_request
from tessellm.entrypoints.openai.protocol import (CHAT_UNSUPPORTED, UNSUPPORTED, UNSUPPORTED_FIX,
                                                  ChatCompletionRequest, CompletionRequest, StreamOptions)
from tessellm.entrypoints.openai.server_config import ServerConfig
from tessellm.kv_transfer.params import check_kv_transfer_params as check_kv_params_keys
from tessellm.structured_output.params import StructuredOutputsParams

_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI default for /v1/completions


def check_model(requested: Optional[str], config: ServerConfig):
    """None or "" (as vLLM) is the served model; another name must be served (404 otherwise).
    Returns the LoRA adapter the name selects (None: the base model), resolved now: the
    request keeps it if the adapter is unloaded while its prompt is being prepared."""
    if requested and requested not in config.served_model_names:
        lora = config.lora_for(requested)
        if lora is not None:
            return lora
        names = config.served_model_names + sorted(config.lora.adapters if config.lora else ())
        raise OpenAIError(f"The model '{requested}' does not exist. This server serves "
                          f"{', '.join(repr(n) for n in names)}.", 404, "model", "model_not_found")
    return None


def check_kv_transfer_params(req: BaseModel, info) -> None:
    """vLLM's per-request ``kv_transfer_params``: a JSON object, on an engine with a KV
    connector (docs/kv_transfer.md)."""
    params = getattr(req, "kv_transfer_params", None)
    if params is None:
        return
    if not isinstance(params, dict):
        raise bad_request("kv_transfer_params must be a JSON object, e.g. {\"do_remote_decode\": "
                          f"true}}; got {type(params).__name__}.", "kv_transfer_params")
    if not getattr(info, "kv_connector", False):
        raise bad_request("kv_transfer_params needs a server started with --kv-transfer-config "
                          "(a KV connector, docs/kv_transfer.md); leave it out here.",
                          "kv_transfer_params", "unsupported_parameter")
    try:
        check_kv_params_keys(params)
    except ValueError as exc:
        raise bad_request(str(exc), "kv_transfer_params") from None


def apply_server_defaults(req: BaseModel, config: ServerConfig) -> None:
    """The server's defaults for fields a request leaves unset (vLLM's
    --return-tokens-as-token-ids)."""
    if getattr(req, "return_tokens_as_token_ids", False) is None:
        req.return_tokens_as_token_ids = config.return_tokens_as_token_ids
    if config.force_include_usage and getattr(req, "stream", False):  # --enable-force-include-usage
        options = req.stream_options or StreamOptions()
        req.stream_options = options.model_copy(update={"include_usage": True})


def request_chat_template(req: ChatCompletionRequest, config: ServerConfig) -> Optional[str]:
    """The chat template a request renders with: its own ``chat_template`` with
    --trust-request-chat-template (vLLM's rule; a 400 without it), else the server's."""
    if req.chat_template is None:
        return config.chat_template
    if not config.trust_request_chat_template:
        raise bad_request("'chat_template' in a request is used only on a server started with "
                          "--trust-request-chat-template (as vLLM); remove it, or set the server's "
                          "template with --chat-template.", "chat_template", "unsupported_parameter")
    return req.chat_template


def merged_template_kwargs(kwargs: Optional[dict], config: ServerConfig) -> Optional[dict]:
    """A request's chat_template_kwargs over the server's --default-chat-template-kwargs."""
    if not config.default_chat_template_kwargs:
        return kwargs
    return {**config.default_chat_template_kwargs, **(kwargs or {})}


_HARMONY_EFFORTS = ("low", "medium", "high")  # gpt-oss's template (openai/harmony.py)


def reasoning_template_kwargs(req: ChatCompletionRequest, kwargs: Optional[dict], harmony: bool) -> Optional[dict]:
    """The template variables ``reasoning_effort`` adds, as vLLM: the effort itself (gpt-oss's
    template reads it) and, unless ``kwargs`` (the request's chat_template_kwargs over the
    server's) set it, ``enable_thinking = reasoning_effort != "none"``: templates that think only
    when asked (Gemma 4's) think, and ``"none"`` turns Qwen 3's thinking off."""
    effort = req.reasoning_effort
    if effort is None:
        return kwargs
    if harmony and effort not in _HARMONY_EFFORTS:
        raise bad_request(f"reasoning_effort {effort!r} is not one of gpt-oss's levels; send "
                          f"{', '.join(_HARMONY_EFFORTS)}.", "reasoning_effort", "invalid_value")
    out = {**(kwargs or {}), "reasoning_effort": effort}
    out.setdefault("enable_thinking", effort != "none")
    return out


def check_unsupported(req: BaseModel) -> None:
    unsupported = {**UNSUPPORTED, **CHAT_UNSUPPORTED} if isinstance(req, ChatCompletionRequest) else UNSUPPORTED
    for name, neutral in unsupported.items():
        if name == "chat_template":
            continue  # request_chat_template decides
        if name in type(req).model_fields and getattr(req, name) not in neutral:
            fix = UNSUPPORTED_FIX.get(name)
            raise bad_request(f"'{name}' is not supported by tessellm yet; "
                              + (f"remove it ({fix})." if fix else "remove it from the request."),
                              name, "unsupported_parameter")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
    _check_logprob_token_ids(req)
    if req.prompt_logprobs and req.stream:
        raise bad_request("prompt_logprobs are not available with stream=true (as in vLLM); ask for them "
                          "in a request that is not streamed.", "prompt_logprobs")
    if not req.use_beam_search and req.length_penalty not in (None, 1.0):
        raise bad_request("length_penalty applies only to beam search; send use_beam_search: true "
                          "or leave length_penalty out.", "length_penalty", "unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
    if isinstance(req, CompletionRequest) and req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens must be at least 1; 0 is accepted only with echo (to score the "
                          "prompt).", "max_tokens", "invalid_value")
    if isinstance(req, CompletionRequest) and req.best_of not in (None, 1, req.n or 1):
        raise bad_request("best_of other than n is not supported by tessellm (no ranking of samples).",
                          "best_of", "unsupported_parameter")


def _check_logprob_token_ids(req) -> None:
    """vLLM's rules for ``logprob_token_ids`` at the server: they replace the top k of a
    request that asks for logprobs, on generated positions, outside beam search."""
    if not req.logprob_token_ids:
        return
    if req.use_beam_search:
        raise bad_request("logprob_token_ids is not supported with beam search; drop one of them.",
                          "logprob_token_ids", "unsupported_parameter")
    if isinstance(req, ChatCompletionRequest):
        if not req.logprobs:
            raise bad_request("logprob_token_ids requires logprobs to be true.", "logprob_token_ids")
        return
    if req.logprobs is None:
        raise bad_request("logprob_token_ids requires logprobs to be set (any number: the listed ids "
                          "replace the top logprobs).", "logprob_token_ids")
    if req.echo_only:
        raise bad_request("logprob_token_ids is not supported with echo and max_tokens 0: no output "
                          "token is generated.", "logprob_token_ids")


def check_limits(req: Union[CompletionRequest, ChatCompletionRequest], config: ServerConfig,
                 info) -> None:
    """The server's limits, and what the engine (``info``: its EngineInfo) takes: logprob
    counts against its vocabulary, a priority under its scheduling policy (beam search too)."""
    try:
        check_priority(req.priority, info.scheduling_policy)
    except ValueError as exc:
        raise bad_request(str(exc), "priority") from None
    n = req.n or 1
    if n > config.max_n:
        raise bad_request(f"n is {n}, over this server's limit of {config.max_n} (--max-n).", "n")
    num_logprobs, field = _num_logprobs(req)
    if req.logprob_token_ids:  # vLLM's: the listed ids replace the top k, whose count is not used
        num_logprobs = None
    for value, name in ((num_logprobs, field), (req.prompt_logprobs, "prompt_logprobs")):
        _check_logprobs_limit(value, name, config.max_logprobs, info.vocab_size)
    max_tokens, field = requested_max_tokens(req)
    if max_tokens is not None and config.max_tokens is not None and max_tokens > config.max_tokens:
        raise bad_request(f"{field} is {max_tokens}, over this server's limit of {config.max_tokens} "
                          "output tokens per request (--max-tokens-limit).", field)


def _check_logprobs_limit(value: Optional[int], name: str, limit: int, vocab_size: int) -> None:
    """vLLM's rule: -1 asks for the whole vocabulary, and counts as ``vocab_size`` against
    --max-logprobs (itself -1: no limit)."""
    if value is None or limit == -1 or (vocab_size if value == -1 else value) <= limit:
        return
    asked = f"-1 (the whole vocabulary, {vocab_size} tokens)" if value == -1 else str(value)
    raise bad_request(f"{name} is {asked}, over this server's limit of {limit} (--max-logprobs; "
                      "a server started with --max-logprobs -1 has no limit).", name)


def requested_max_tokens(req) -> tuple[Optional[int], str]:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens, "max_completion_tokens"
    return req.max_tokens, "max_tokens"


def _num_logprobs(req) -> tuple[Optional[int], str]:
    if isinstance(req, ChatCompletionRequest):
        return ((req.top_logprobs or 0) if req.logprobs else None), "top_logprobs"
    return req.logprobs, "logprobs"


def resolve_max_tokens(req, prompt_len: int, max_model_len: int, config: ServerConfig,
                       defaults: Optional[dict] = None) -> int:
    """The request's output budget; refuses prompt + max_tokens over the context length.
    ``defaults``: the model's generation-config sampling defaults (their ``max_tokens`` caps the
    budget of a request that sets none, as in vLLM)."""
    max_tokens, field = requested_max_tokens(req)
    room = max_model_len - prompt_len
    if getattr(req, "echo_only", False):
        return 1  # one token is sampled for the prompt's logprobs, then dropped (serving_completion)
    if max_tokens is None:
        default = _COMPLETIONS_DEFAULT_MAX_TOKENS if isinstance(req, CompletionRequest) else room
        limit = config.max_tokens if config.max_tokens is not None else room
        model_cap = (defaults or {}).get("max_tokens", room)
        return max(1, min(default, room, limit, model_cap))
    if max_tokens > room:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you "
                          f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                          f"{max_tokens} in the completion). Reduce the prompt or {field}.", field,
                          "context_length_exceeded")
    return max_tokens


def to_sampling_params(req, max_tokens: int, vocab_size: int,
                       structured: Optional[StructuredOutputsParams] = None,
                       defaults: Optional[dict] = None) -> SamplingParams:
    """``defaults``: the model's generation-config values for the fields the request leaves
    unset (tessellm/generation_config.py); the neutral ones otherwise."""
    num_logprobs, logprobs_field = _num_logprobs(req)
    defaults = defaults or {}

    def pick(name: str, neutral):
        value = getattr(req, name)
        return defaults.get(name, neutral) if value is None else value

    try:
        return SamplingParams(
            n=req.n or 1,
            output_kind=output_kind(req),
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0) or 0,
            min_p=pick("min_p", 0.0) or 0.0,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=pick("repetition_penalty", 1.0),
            logprobs=None if req.logprob_token_ids else num_logprobs,
            logprob_token_ids=req.logprob_token_ids or None,
            prompt_logprobs=_prompt_logprobs(req, num_logprobs),
            repetition_detection=req.repetition_detection,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logit_bias=_logit_bias(req.logit_bias, vocab_size),
            allowed_token_ids=req.allowed_token_ids,
            bad_words=req.bad_words or None,
            thinking_token_budget=req.thinking_token_budget,
            structured_outputs=structured,
            kv_transfer_params=req.kv_transfer_params,
            extra_args=dict(req.vllm_xargs) if req.vllm_xargs else None,  # vLLM's: merged there
        )
    except ValueError as exc:  # SamplingParams' messages start with the field's name
        name = re.match(r"\w*", str(exc)).group()
        if name == "logprobs":  # the request's field that set it (chat: top_logprobs)
            name = logprobs_field
        raise bad_request(str(exc), name if name in type(req).model_fields else None) from exc


def output_kind(req) -> RequestOutputKind:
    """vLLM's server's: a stream takes DELTA outputs (only what is new each step), a request
    answered whole FINAL_ONLY (one output, at its end); see serving.py."""
    return RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY


def _prompt_logprobs(req, num_logprobs: Optional[int]) -> Optional[int]:
    """vLLM's: the request's prompt_logprobs (not when streamed: never sent), else for echo with
    logprobs the same k as the output's."""
    if req.prompt_logprobs is not None and not req.stream:
        return req.prompt_logprobs
    if getattr(req, "echo", False):
        return num_logprobs
    return None


def _logit_bias(bias: Optional[dict[str, float]], vocab_size: int) -> Optional[dict[int, float]]:
    if not bias:
        return None
    result = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}.", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise bad_request(f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size}).",
                              "logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias values must be in [-100, 100], got {value} for token {token}.",
                              "logit_bias")
        result[token] = float(value)
    return result
