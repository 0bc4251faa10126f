"""Prompt tokens as a request shapes them: vLLM's ``add_special_tokens`` (a text prompt at
/v1/completions) and ``truncate_prompt_tokens`` / ``truncation_side`` (both endpoints).

Truncation keeps ``truncate_prompt_tokens`` tokens (-1: the context less the request's output
budget, as vLLM's server), the last ones by default ("left": the start is cut) or the first ones ("right"), before the
prompt is checked against the context, so a long document can be cut to fit instead of refused.
Without ``truncation_side`` a text prompt is cut by the tokenizer, so a BOS it adds stays
(``tessellm/core/prompt_truncation.py``, vLLM's rule); with one, its ids are sliced.
"""

from __future__ import annotations

from typing import Optional, Union

from tessellm.core.input_processor import ProcessedPrompt
from tessellm.core.scheduler_config import RequestParamError, prompt_tokens_to_keep
from tessellm.entrypoints.async_llm import AsyncLLM
from tessellm.entrypoints.openai.errors import bad_request
from tessellm.entrypoints.openai.protocol import CompletionRequest
from tessellm.entrypoints.openai.sampling import _COMPLETIONS_DEFAULT_MAX_TOKENS, requested_max_tokens


def truncation(req, max_model_len: int) -> Optional[int]:
    """How many prompt tokens to keep (None: all). As vLLM's server (its request's
    ``build_tok_params``), the room the request asks for is the context less its output budget
    (``max_completion_tokens`` / ``max_tokens``; unset: /v1/completions' default of 16, chat's
    none, one token kept free here as offline): -1 keeps that many, a larger count is a 400."""
    n = req.truncate_prompt_tokens
    if n is None:
        if req.truncation_side is not None:
            raise bad_request("truncation_side needs truncate_prompt_tokens.", "truncation_side")
        return None
    try:
        prompt_tokens_to_keep(n, max_model_len)  # 0 and counts past the context: offline's words
    except RequestParamError as exc:
        raise bad_request(str(exc), exc.param) from None
    output, field = requested_max_tokens(req)
    if output is None:
        output = _COMPLETIONS_DEFAULT_MAX_TOKENS if isinstance(req, CompletionRequest) else 0
    room = max_model_len - max(output, 1)
    if room < 1:
        raise bad_request(f"{field} is {output}, which leaves no room for a prompt in the model's context "
                          f"length of {max_model_len} tokens; ask for fewer tokens.", field,
                          "context_length_exceeded")
    if n == -1:
        return room
    if n > room:
        raise bad_request(f"truncate_prompt_tokens is {n}, over the model's context length of {max_model_len} "
                          f"tokens less the {output} {field} asks for ({room}); give at most {room}, or -1 "
                          "for as many as fit.", "truncate_prompt_tokens")
    return n


def truncate(ids: list[int], keep: Optional[int], side: Optional[str]) -> list[int]:
    if keep is None or len(ids) <= keep:
        return ids
    return ids[:keep] if side == "right" else ids[len(ids) - keep:]


async def process_completion_prompt(engine: AsyncLLM, prompt: Union[str, dict], req,
                                    keep: Optional[int]) -> ProcessedPrompt:
    """One /v1/completions prompt (text, or ``{"prompt_token_ids": [...]}``), tokenized with the
    request's add_special_tokens and truncated; ValueError as ``process_prompt``'s."""
    custom = not req.add_special_tokens or keep is not None
    if isinstance(prompt, str) and custom and engine.tokenizer is not None and prompt:
        if keep is None:
            engine.check_text_fits(len(prompt))  # truncated text may be long: the body limit bounds it
        # no truncation_side: cut by the tokenizer (its special tokens kept), as vLLM; a side
        # given: the whole text's ids sliced from that side below, as vLLM
        cut = keep if req.truncation_side is None else None
        ids = await engine.run_off_loop(lambda: engine.inputs.truncator.encode(
            engine.tokenizer, prompt, cut, req.add_special_tokens))
        # a text the tokenizer cut no longer matches its ids: echo decodes the ids
        prompt = {"prompt_token_ids": ids} if cut is not None and len(ids) >= cut else {
            "prompt": prompt, "prompt_token_ids": ids}
    if isinstance(prompt, dict) and keep is not None:
        ids = truncate(prompt["prompt_token_ids"], keep, req.truncation_side)
        if len(ids) < len(prompt["prompt_token_ids"]):
            prompt = {"prompt_token_ids": ids}  # the text no longer matches: echo decodes the ids
    return await engine.process_prompt_async(prompt)
