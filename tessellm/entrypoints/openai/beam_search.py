"""``use_beam_search: true`` at /v1/completions and /v1/chat/completions (vLLM's field): ``n`` is
the beam width, ``temperature`` (default 1.0, as vLLM), ``length_penalty`` (default 1.0),
``ignore_eos``, ``include_stop_str_in_output`` and ``max_tokens`` apply; the search is
tessellm/entrypoints/beam_search.py's, each step's beams sent to the engine as requests.

``stream: true`` streams as vLLM does: beams are ranked only when the search ends, so the
events come after it (keep-alive comments meanwhile), one chunk per beam with its whole text
and finish_reason, then usage if ``stream_options`` asks, then ``[DONE]``. vLLM ignores the
sampling fields the search does not use; tessellm refuses those (``stop``, ``top_p``, ...) with
a 400 naming the field, so a request never silently means something else.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from tessellm.core.input_processor import ProcessedPrompt
from tessellm.core.outputs import CompletionOutput, RequestOutput
from tessellm.entrypoints.beam_search import BeamSearch, BeamSearchParams, drive, step_logprobs, step_params
from tessellm.entrypoints.openai.errors import bad_request
from tessellm.entrypoints.openai.serving import ChunkRenderer, collect, random_id, sse_stream, submit

# request field -> the values a beam search accepts (it does not apply the field otherwise)
_NOT_APPLIED = {
    "stop": (None, [], ""), "stop_token_ids": (None, []), "min_tokens": (0,),
    "top_p": (None, 1.0), "top_k": (None, 0, -1), "min_p": (None, 0.0), "seed": (None,),
    "presence_penalty": (None, 0.0), "frequency_penalty": (None, 0.0), "repetition_penalty": (None, 1.0),
    "logit_bias": (None, {}), "allowed_token_ids": (None,), "bad_words": (None, []),
    "prompt_logprobs": (None,), "best_of": (None, 1), "thinking_token_budget": (None, -1),
}


def beam_params(req, max_tokens: int, defaults: dict, structured) -> BeamSearchParams:
    """The request's BeamSearchParams (vLLM's ``to_beam_search_params``); a 400 naming any
    field the search would not apply."""
    for name, neutral in _NOT_APPLIED.items():
        value = getattr(req, name, None)
        if value not in neutral and not (name == "best_of" and value == req.n):
            raise bad_request(f"'{name}' does not apply to beam search (use_beam_search); remove it "
                              "or send it at its default.", name, "unsupported_parameter")
    if structured is not None:
        raise bad_request("Structured output does not combine with beam search (use_beam_search).",
                          "use_beam_search", "unsupported_parameter")
    temperature = req.temperature if req.temperature is not None else defaults.get("temperature", 1.0)
    length_penalty = 1.0 if req.length_penalty is None else req.length_penalty
    try:
        return BeamSearchParams(beam_width=req.n or 1, max_tokens=max_tokens, ignore_eos=req.ignore_eos,
                                temperature=temperature, length_penalty=length_penalty,
                                include_stop_str_in_output=req.include_stop_str_in_output)
    except ValueError as exc:
        raise bad_request(str(exc), "length_penalty" if "length_penalty" in str(exc) else None) from exc


async def beam_search(engine, prompts: list[ProcessedPrompt], params: list[BeamSearchParams], lora,
                      cache_salt: Optional[str], http_request, heartbeat: float,
                      priority: int = 0) -> list[RequestOutput]:
    """One RequestOutput per prompt whose ``outputs`` are its best beams (``index`` = rank);
    every step's beams go to the engine together, at the request's ``priority`` (vLLM's field,
    checked against the scheduling policy by ``sampling.check_limits``), and a client that
    leaves aborts them."""
    _check_prompts(prompts)
    info = engine.info
    searches = [BeamSearch(p.prompt_token_ids, bp, info.eos_token_ids, info.max_model_len)
                for p, bp in zip(prompts, params)]
    sampling = step_params(params[0], info.vocab_size)  # beam width and temperature: the request's
    steps, base = drive(searches), random_id("beam")
    try:
        batch, step = next(steps), 0
        while True:
            sub = submit(engine, f"{base}-{step}", [ProcessedPrompt(None, t) for _, t in batch],
                         [sampling] * len(batch), lora, cache_salt, priority)
            outs = await collect(engine, sub, http_request, heartbeat)
            batch, step = steps.send([step_logprobs(o) for o in outs]), step + 1
    except StopIteration:
        pass
    return [_request_output(engine, f"{base}-{i}", p, s) for i, (p, s) in enumerate(zip(prompts, searches))]


def beam_search_stream(engine, prompts: list[ProcessedPrompt], params: list[BeamSearchParams], lora,
                       cache_salt: Optional[str], http_request, heartbeat: float,
                       renderer: ChunkRenderer, stream_options, priority: int = 0):
    """``stream: true``: the search runs as a task from now; the stream sends a keep-alive every
    ``heartbeat`` seconds until it ends, then its beams through ``renderer``. A client that
    leaves cancels the task, which aborts the step in flight."""
    _check_prompts(prompts)  # a 400 before the stream starts
    task = asyncio.ensure_future(beam_search(engine, prompts, params, lora, cache_salt, http_request,
                                             heartbeat, priority))
    return sse_stream(_when_done(task, heartbeat), renderer, stream_options, task.cancel)


async def _when_done(task: asyncio.Future, heartbeat: float):
    """None (a keep-alive) every ``heartbeat`` seconds while ``task`` runs, then
    ``(prompt index, output)`` for each of its outputs."""
    while not (await asyncio.wait({task}, timeout=heartbeat))[0]:
        yield None
    for i, out in enumerate(task.result()):
        yield i, out


def _check_prompts(prompts: list[ProcessedPrompt]) -> None:
    if any(p.mm_features for p in prompts):
        raise bad_request("Beam search over images is not supported; send the request without "
                          "use_beam_search.", "use_beam_search", "unsupported_parameter")


def _request_output(engine, request_id: str, prompt: ProcessedPrompt, search: BeamSearch) -> RequestOutput:
    """vLLM's server shape: the beams' output tokens (EOS only with include_stop_str_in_output),
    their text without the EOS, finish_reason "stop" at EOS else "length"."""
    outputs = []
    for rank, seq in enumerate(search.best()):
        ids = seq.tokens[search.prompt_len:]
        shown = ids[:-1] if seq.finish_reason == "stop" and ids and ids[-1] in search.eos else ids
        text = engine.tokenizer.decode(shown) if engine.tokenizer is not None else ""
        outputs.append(CompletionOutput(rank, text, ids, seq.cum_logprob, seq.logprobs,
                                        seq.finish_reason or "length", seq.stop_reason))
    return RequestOutput(request_id, prompt.prompt, prompt.prompt_token_ids, outputs, True)
