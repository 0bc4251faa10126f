"""What chat and completions share: parse, submit, then wait for the end or stream SSE.

A streamed request is answered with ``text/event-stream``: one ``data: {json}`` event per
chunk, ``data: [DONE]`` at the end, an SSE comment (``: keep-alive``) after every
``sse_keepalive_s`` of silence (queued, or in a long prefill) so proxies keep the stream
open, and an error that happens mid-stream as a last ``data: {"error": ...}`` event (then
``data: [DONE]``, as vLLM; a request the engine failed, finish reason "error", is one).
Whatever ends the stream (done, error, client gone: Starlette cancels the generator) aborts
the requests that are still running, which frees their KV blocks in the core.

Output kinds (``to_sampling_params``, as vLLM's server): a streamed request's outputs are
DELTA, each with only what is new (a renderer sends it as it is, keeping what it needs of the
whole in ``output_so_far``); a request answered whole is FINAL_ONLY, so ``collect`` gets one
output, the finished one, and is not woken by the steps before it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Optional, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from tessellm.core.core_tokenizer import TokenizerLoadingError
from tessellm.core.engine_process import EngineDeadError
from tessellm.core.input_processor import ProcessedPrompt, check_cache_salt
from tessellm.core.outputs import Logprob, RequestOutput
from tessellm.core.sampling_params import SamplingParams
from tessellm.entrypoints.async_llm import AsyncLLM, RequestStream, iterate_streams
from tessellm.entrypoints.openai.errors import OpenAIError, bad_request, from_validation_error
from tessellm.entrypoints.openai.output_so_far import RequestSoFar
from tessellm.entrypoints.openai.protocol_responses import PromptLogprob, PromptLogprobs, UsageInfo

logger = logging.getLogger(__name__)

# Retry-After of a constrained request refused while set_tokenizer loads: the cores load a
# tokenizer from a local directory or the Hugging Face cache in about a second.
TOKENIZER_LOADING_RETRY_S = 1

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DISCONNECT_CHECK_S = 1.0  # how often a non-streamed request checks that its client is still there


def parse_request(cls: type[BaseModel], body) -> BaseModel:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def response_id(prefix: str, req, engine_id: str) -> str:
    """The response's id: vLLM's ``{prefix}-{request_id}`` when the request names one (the engine's
    own id stays unique: two clients may send the same request_id)."""
    return f"{prefix}-{req.request_id}" if req.request_id else engine_id


_MIN_LOGPROB = -9999.0  # vLLM's floor: JSON has no -inf (it would go out as null)


def json_logprob(logprob: float) -> float:
    """A logprob a JSON client can read: -inf (a token masked by a grammar or a -100 bias) as
    -9999.0, as vLLM sends it."""
    return max(logprob, _MIN_LOGPROB)


def token_string(engine: AsyncLLM, tid: int, lp: Optional[Logprob], as_id: Optional[bool]) -> str:
    """A token in logprobs: its text, or vLLM's ``token_id:{id}`` with return_tokens_as_token_ids
    (for tokens that are not whole UTF-8 characters)."""
    if as_id:
        return f"token_id:{tid}"
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    tok = engine.tokenizer
    return tok.decode([tid]) if tok is not None else f"<{tid}>"


def engine_error(exc: BaseException) -> OpenAIError:
    """An exception from the engine side, as the error a client should see."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return OpenAIError(str(exc), 503, None, "engine_dead")
    if isinstance(exc, TokenizerLoadingError):  # set_tokenizer in flight: retry in a moment
        return OpenAIError(str(exc), 503, exc.param, "tokenizer_loading", retry_after=TOKENIZER_LOADING_RETRY_S)
    if isinstance(exc, ValueError):
        return bad_request(str(exc), getattr(exc, "param", None))  # RequestParamError names it
    logger.exception("Request failed", exc_info=exc)
    return OpenAIError(f"Internal error: {type(exc).__name__}: {exc}", 500)


def raise_if_error(out) -> None:
    """vLLM's ``_raise_if_error``: a sample the engine failed (finish_reason "error": a custom
    logits processor raised in its step) fails the whole request with vLLM's 500, ``Internal
    server error`` (in a stream, as its last event); the cause is logged here, not sent."""
    for co in out.outputs if isinstance(out, RequestOutput) else ():
        if co.finish_reason == "error":
            logger.error("Request %s failed with an internal error during generation: %s",
                         out.request_id, co.stop_reason)
            raise OpenAIError("Internal server error", 500)


@dataclass
class Submitted:
    """A request's engine requests: one per prompt, each with n samples."""

    request_ids: list[str]
    streams: list[RequestStream]
    event: asyncio.Event  # shared: set when any of the streams has news
    prompts: list[ProcessedPrompt]

    def abort(self, engine: AsyncLLM) -> None:
        for rid in self.request_ids:
            engine.abort(rid)


@dataclass
class RequestLog:
    """vLLM's --enable-log-requests / --enable-log-outputs / --max-log-len: one INFO line (logger
    ``tessellm.requests``) per request received and, with outputs, per request finished."""

    requests: bool = False
    outputs: bool = False
    max_len: Optional[int] = None  # characters of text, ids of a token list; None: all

    def _cut(self, value):
        if self.max_len is None or value is None:
            return value
        return value[:self.max_len]

    def received(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams) -> None:
        if self.requests:
            _request_logger.info("Received request %s: prompt: %r, prompt_token_ids: %s, params: %s",
                                 request_id, self._cut(prompt.prompt), self._cut(list(prompt.prompt_token_ids)),
                                 params)

    def finished(self, out: RequestOutput) -> None:
        if self.outputs:
            for co in out.outputs:
                _request_logger.info("Generated response %s (sample %d): output: %r, output_token_ids: %s, "
                                     "finish_reason: %s", out.request_id, co.index, self._cut(co.text),
                                     self._cut(list(co.token_ids)), co.finish_reason)


_request_logger = logging.getLogger("tessellm.requests")
NO_REQUEST_LOG = RequestLog()


def request_log(engine: AsyncLLM) -> RequestLog:
    """The server's request logging (build_app sets ``engine.request_log``)."""
    return getattr(engine, "request_log", NO_REQUEST_LOG)


def submit(engine: AsyncLLM, base_id: str, prompts: list[ProcessedPrompt],
           params: list[SamplingParams], lora_request=None, cache_salt=None,
           priority: int = 0) -> Submitted:
    """``cache_salt``, ``priority``: the request's (vLLM's fields), for every prompt of it."""
    sub = Submitted([], [], asyncio.Event(), prompts)
    log = request_log(engine)
    try:
        if cache_salt is not None:
            salt = check_cache_salt(cache_salt)
            prompts = [replace(p, cache_salt=salt) for p in prompts]
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            rid = f"{base_id}-{i}"
            log.received(rid, prompt, p)
            sub.streams.append(engine.add_request(rid, prompt, p, sub.event, lora_request,
                                                  priority=priority))
            sub.request_ids.append(rid)
    except BaseException as exc:
        sub.abort(engine)
        if isinstance(exc, (ValueError, EngineDeadError)):
            raise engine_error(exc) from None
        raise
    return sub


async def collect(engine: AsyncLLM, sub: Submitted, http_request: Request,
                  heartbeat: float) -> list[RequestOutput]:
    """Wait for every request to finish; abort them if the client goes away meanwhile.

    Outputs may flow without pause, so the disconnect check runs on a clock (at most every
    ``_DISCONNECT_CHECK_S``), not only in silences.
    """
    final: list[Optional[RequestOutput]] = [None] * len(sub.streams)
    interval = min(heartbeat, _DISCONNECT_CHECK_S)
    next_check = time.monotonic() + interval
    try:
        async for item in iterate_streams(sub.streams, sub.event, interval):
            if time.monotonic() >= next_check:
                if await http_request.is_disconnected():
                    raise OpenAIError("The client disconnected.", 400, None, "client_disconnected")
                next_check = time.monotonic() + interval
            if item is None:
                continue
            raise_if_error(item[1])
            if item[1].finished:
                final[item[0]] = item[1]
                request_log(engine).finished(item[1])
    except Exception as exc:  # noqa: BLE001
        raise engine_error(exc) from None
    finally:
        sub.abort(engine)
    return final  # type: ignore[return-value]


class ChunkRenderer(Protocol):
    def start(self) -> list[BaseModel]: ...
    def update(self, index: int, output: RequestOutput) -> list[BaseModel]: ...
    def finish(self) -> list[BaseModel]: ...


def sse_response(engine: AsyncLLM, sub: Submitted, renderer: ChunkRenderer, heartbeat: float,
                 stream_options) -> StreamingResponse:
    items = iterate_streams(sub.streams, sub.event, heartbeat)
    log = request_log(engine)
    if log.outputs:
        items = _logged(items, log)
    return sse_stream(items, renderer, stream_options, lambda: sub.abort(engine))


async def _logged(items, log: RequestLog):
    """``items`` as they are; each request's whole output logged when it finishes (its DELTA
    outputs folded)."""
    so_far: dict[int, RequestSoFar] = {}
    async for item in items:
        if item is not None:
            whole = so_far.setdefault(item[0], RequestSoFar())
            whole.add(item[1])
            if whole.finished:
                log.finished(whole.output())
        yield item


def sse_stream(items: AsyncIterator[Optional[tuple[int, RequestOutput]]], renderer: ChunkRenderer,
               stream_options, close: Callable[[], None]) -> StreamingResponse:
    """An SSE response of ``items`` (``(prompt index, output)``, or None for a keep-alive)
    through ``renderer``; ``close`` runs when the stream ends or the client leaves (it must not
    await: it may run while the stream is being cancelled)."""
    include_usage = bool(stream_options is not None and stream_options.include_usage)
    return StreamingResponse(_sse_events(items, renderer, include_usage, close),
                             media_type="text/event-stream", headers=SSE_HEADERS)


async def _sse_events(items, renderer: ChunkRenderer, include_usage: bool, close: Callable[[], None]):
    try:
        for chunk in renderer.start():
            yield _event(chunk, include_usage)
        async for item in items:
            if item is None:
                yield ": keep-alive\n\n"
                continue
            raise_if_error(item[1])
            for chunk in renderer.update(*item):
                yield _event(chunk, include_usage)
        for chunk in renderer.finish():
            yield _event(chunk, include_usage)
        yield "data: [DONE]\n\n"
    except Exception as exc:  # noqa: BLE001 - becomes the stream's last event
        yield engine_error(exc).sse_event()
        yield "data: [DONE]\n\n"
    finally:
        close()  # never awaits: safe while being cancelled


def usage(outputs: list[RequestOutput], details: bool = False) -> UsageInfo:
    """Token counts over finished requests (every prompt, every sample); ``details``
    (--enable-prompt-tokens-details): the prompt tokens the prefix cache served."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = {"prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)}} if details else {}
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion, **cached)


def prompt_logprobs(out: RequestOutput, asked: Optional[int]) -> Optional[PromptLogprobs]:
    """vLLM's ``prompt_logprobs`` (when the request asked for them): per prompt token None for the
    first, else token id -> {logprob, rank, decoded_token}."""
    if asked is None or out.prompt_logprobs is None:
        return None
    return [None if entry is None else
            {tid: PromptLogprob(logprob=json_logprob(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
             for tid, lp in entry.items()}
            for entry in out.prompt_logprobs]


def _event(chunk: BaseModel, include_usage: bool) -> str:
    """A chunk as an SSE event; without stream_options.include_usage it has no usage key at all
    (OpenAI, vLLM), with it ``"usage": null`` except on the last (usage) chunk."""
    return f"data: {chunk.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


def finish_reason(reason: Optional[str]) -> Optional[str]:
    """The engine's reasons as OpenAI's: stop or length (an abort never reaches a client: one
    the core makes, naming why, is the request's error, AsyncLLM._route; an "error" is a 500,
    ``raise_if_error``); vLLM's "repetition" (repetition_detection) as it is."""
    if reason is None:
        return None
    return reason if reason in ("length", "repetition") else "stop"
