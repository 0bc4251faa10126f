"""POST /v1/responses (OpenAI's Responses API) on the chat path.

The request becomes the chat request it means (``input.py``) and runs through
``serving_chat.prepare_chat``: the same template, validation, sampling, structured output,
tool-call parser, reasoning parser and harmony parsing as /v1/chat/completions. The chat
path's message (whole) or deltas (streamed) become output items (``items.py``): a
``reasoning`` item, a ``message`` with ``output_text``, ``function_call`` items.

Status "incomplete" with ``incomplete_details.reason`` "max_output_tokens" when the output was
cut by its token budget. With ``--responses-store-size N`` responses are kept (unless
``store: false``) for ``previous_response_id`` and ``GET /v1/responses/{id}`` (store.py);
without it ``store`` is answered false and ``previous_response_id`` is a 400.

A stream is server-sent events, ``event: <type>`` then ``data: <json>``, each with a
``sequence_number``: response.created, response.in_progress, the items' events (items.py),
then response.completed (or response.incomplete). An error mid-stream (a request the engine
failed, finish reason "error", among them) is vLLM's ``error`` event, then OpenAI's
``response.failed`` (status "failed", ``error`` {code, message}, the items so far) as the last;
that failed response is stored as a finished one is (``GET /v1/responses/{id}`` answers it).
No ``[DONE]`` (OpenAI sends none here). Not streamed, a failed request is vLLM's HTTP 500.

``background: true`` (needs the store): the response is answered ``queued`` at once and runs on
(background.py); ``cancel_response`` stops it, ``stream_stored`` replays a streamed one.
"""

from __future__ import annotations

import json
import time
from typing import Optional

from fastapi import Request
from fastapi.responses import StreamingResponse

from tessellm.core.outputs import RequestOutput
from tessellm.entrypoints.async_llm import AsyncLLM, iterate_streams
from tessellm.entrypoints.openai.errors import OpenAIError, bad_request
from tessellm.entrypoints.openai.responses.background import BackgroundRun
from tessellm.entrypoints.openai.responses.input import (check_unsupported, input_items, rename_error,
                                                         to_chat_request)
from tessellm.entrypoints.openai.responses.items import Event, ItemBuilder
from tessellm.entrypoints.openai.responses.protocol import (IncompleteDetails, InputTokensDetails,
                                                            OutputTokensDetails, ResponseObject,
                                                            ResponsesRequest, ResponseUsage)
from tessellm.entrypoints.openai.responses.store import ResponseStore, StoredResponse
from tessellm.entrypoints.openai.serving import (SSE_HEADERS, Submitted, collect, engine_error, parse_request,
                                                 raise_if_error, submit)
from tessellm.entrypoints.openai.serving_chat import ChatJob, prepare_chat
from tessellm.entrypoints.openai.server_config import ServerConfig


async def create_response(engine: AsyncLLM, config: ServerConfig, store: ResponseStore, body,
                          http_request: Request):
    req: ResponsesRequest = parse_request(ResponsesRequest, body)
    check_unsupported(req)
    _check_background(req, store)
    history = store.history(req.previous_response_id) if req.previous_response_id is not None else []
    try:
        job = await prepare_chat(engine, config, to_chat_request(req, history, engine.info.max_model_len),
                                 id_prefix="resp")
    except OpenAIError as exc:
        raise rename_error(exc) from None
    _check_logprobs(job)
    sub = submit(engine, job.request_id, [job.processed], [job.params], job.lora, job.req.cache_salt,
                 job.req.priority)  # the chat request's (to_chat_request: VLLM_EXTRAS)
    result = _Result(engine, req, job, store)
    if req.background:
        return _start_background(engine, sub, result, config.sse_keepalive_s,
                                 getattr(http_request.app.state, "lifecycle", None))
    if req.stream:
        return StreamingResponse(_events(engine, sub, result, config.sse_keepalive_s),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    return await _whole(engine, sub, result, http_request, config.sse_keepalive_s)


async def _whole(engine: AsyncLLM, sub: Submitted, result: "_Result", http_request, heartbeat: float):
    """The response answered whole (the chat path's message made items), stored when kept."""
    out = (await collect(engine, sub, http_request, heartbeat))[0]
    chat = result.job.view.response(out)
    choice = chat.choices[0]
    message = choice.message
    builder = ItemBuilder()
    if message.reasoning is not None:
        builder.reasoning(message.reasoning)
    if message.content:
        builder.text(message.content, _logprobs(choice))
    for i, call in enumerate(message.tool_calls):
        builder.call(i, call.id, call.function.name, call.function.arguments)
    builder.finish(result.item_status(out))
    response = result.response(builder, out)
    response.kv_transfer_params = chat.kv_transfer_params
    return result.keep(response)


def _check_background(req: ResponsesRequest, store: ResponseStore) -> None:
    if not req.background:
        return
    if not store.enabled:
        raise bad_request("background needs stored responses, and this server keeps none: start it with "
                          "--responses-store-size N (or leave background out).", "background",
                          "unsupported_parameter")
    if req.store is False:
        raise bad_request("background can only be used when store is true (a background response is "
                          "read back with GET /v1/responses/{id}).", "background")


class _Detached:
    """A background request's client: it never disconnects (leaving does not stop the run)."""

    @staticmethod
    async def is_disconnected() -> bool:
        return False


def _start_background(engine: AsyncLLM, sub: Submitted, result: "_Result", heartbeat: float, lifecycle=None):
    """Store the response ``queued`` and run it on; the answer is that response, or (streamed)
    the run's events as they come. ``lifecycle``: the server's, whose drain waits for the run."""
    run = BackgroundRun(result.id, bool(result.req.stream))
    result.store.runs[result.id] = run
    result.keep(result.response(None, None, "queued"))

    async def work():
        result.keep(result.response(None, None, "in_progress"))
        if result.req.stream:
            await run.record(_events(engine, sub, result, heartbeat))  # it stores the end itself
            return
        try:
            await _whole(engine, sub, result, _Detached(), heartbeat)
        except OpenAIError as err:  # the engine failed it: stored failed, as a failed stream is
            result.keep(result.failed(ItemBuilder(), err))

    def end() -> None:  # once, however the run ends (cancelled before it starts too)
        sub.abort(engine)
        if lifecycle is not None:
            lifecycle.background -= 1

    if lifecycle is not None:
        lifecycle.background += 1
    run.start(work(), on_end=end)
    if result.req.stream:
        return StreamingResponse(run.follow(0, heartbeat), media_type="text/event-stream", headers=SSE_HEADERS)
    return result.response(None, None, "queued")


async def cancel_response(store: ResponseStore, response_id: str) -> dict:
    """vLLM's ``POST /v1/responses/{id}/cancel``: a background response still queued or in
    progress stops (its engine request aborted) and is stored, and answered, ``cancelled``."""
    stored = store.get(response_id)
    if stored is None:
        raise not_stored(response_id, store)
    run = store.runs.get(response_id)
    status = stored.response.get("status")
    if run is None or status not in ("queued", "in_progress"):
        kind = "background response" if run is not None else "response created without background"
        raise bad_request(f"Response {response_id!r} is a {kind} that is {status}: only a background "
                          "response still queued or in progress can be cancelled.", "response_id")
    stored.response["status"] = "cancelled"  # before the task ends: its last store() keeps this
    await run.cancel()
    stored.response["status"] = "cancelled"
    store.put(response_id, stored)
    return stored.response


async def delete_response(store: ResponseStore, response_id: str) -> dict:
    run = store.runs.get(response_id)
    if run is not None:
        await run.cancel()  # a background response still going stops with it
    if not store.delete(response_id):
        raise not_stored(response_id, store)
    return {"id": response_id, "object": "response", "deleted": True}


def stream_stored(store: ResponseStore, response_id: str, starting_after: Optional[int], heartbeat: float):
    """vLLM's ``GET /v1/responses/{id}?stream=true``: a background stream's events after
    ``starting_after`` (all, without it), then the rest as they come."""
    if store.get(response_id) is None:
        raise not_stored(response_id, store)
    run = store.runs.get(response_id)
    if run is None or not run.streamed:
        raise bad_request(f"Response {response_id!r} was not created with background and stream true, so it "
                          "has no events to stream; GET it without stream.", "stream")
    first = 0 if starting_after is None else starting_after + 1
    if first < 0:
        raise bad_request("starting_after must be a sequence number (0 or more).", "starting_after")
    if run.done and first > len(run.events):  # its stream has ended: nothing would ever come
        raise bad_request(f"starting_after {starting_after} is past the end of response {response_id!r}'s "
                          f"stream: its last event is sequence number {len(run.events) - 1}.", "starting_after")
    return StreamingResponse(run.follow(first, heartbeat), media_type="text/event-stream", headers=SSE_HEADERS)


def not_stored(response_id: str, store: ResponseStore) -> OpenAIError:
    why = (f" (this server keeps the last {store.capacity} responses, in memory, each on the server "
           "process that made it: with Ray Serve or behind a load balancer, another replica's responses "
           "are not here)") if store.enabled else " (this server keeps none: start it with --responses-store-size N)"
    return OpenAIError(f"No response with id {response_id!r} is stored{why}.", 404, "response_id", "not_found")


def _check_logprobs(job: ChatJob) -> None:
    """Token logprobs go with the message's text only when the output is that message alone."""
    view = job.view
    if job.req.logprobs and (view.reasoning is not None or view.harmony is not None
                             or (view.plan is not None and view.plan.parser is not None)):
        raise bad_request("include message.output_text.logprobs is not supported when the output may hold "
                          "reasoning or tool calls (a reasoning parser, gpt-oss, or tools with tool_choice "
                          "other than 'none'); leave it out, or use /v1/chat/completions with logprobs.",
                          "include", "unsupported_parameter")


def _logprobs(choice) -> list:
    return [lp.model_dump() for lp in choice.logprobs.content] if choice.logprobs is not None else []


class _Result:
    """The response object around the items: the request's settings echoed, status, usage."""

    def __init__(self, engine: AsyncLLM, req: ResponsesRequest, job: ChatJob, store: ResponseStore):
        self.engine = engine
        self.req = req
        self.job = job
        self.store = store if store.enabled and req.store is not False else None
        self.id = job.view.id.replace("resp-", "resp_", 1)  # OpenAI's shape: resp_<hex>
        self.created = int(time.time())

    @staticmethod
    def cut(out: Optional[RequestOutput]) -> bool:
        return out is not None and out.outputs[0].finish_reason == "length"

    def item_status(self, out: Optional[RequestOutput]) -> str:
        return "incomplete" if self.cut(out) else "completed"

    def response(self, builder: Optional[ItemBuilder], out: Optional[RequestOutput],
                 status: Optional[str] = None) -> ResponseObject:
        req, params = self.req, self.job.params
        status = status or ("incomplete" if self.cut(out) else "completed")
        text_format = req.text.format.model_dump(by_alias=True, exclude_none=True) \
            if req.text is not None and req.text.format is not None else {"type": "text"}
        return ResponseObject(
            id=self.id, created_at=self.created, status=status, model=self.job.view.model,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens,
            output=builder.items if builder is not None else [],
            parallel_tool_calls=req.parallel_tool_calls is not False,
            reasoning=req.reasoning.model_dump() if req.reasoning is not None else None,
            temperature=params.temperature, top_p=params.top_p, text={"format": text_format},
            top_logprobs=req.top_logprobs,
            tool_choice=req.tool_choice if req.tools and req.tool_choice else ("auto" if req.tools else "none"),
            tools=[{"description": None, "parameters": None, "strict": None, **t} for t in req.tools or []],
            usage=self.usage(builder, out) if out is not None else None, user=req.user,
            metadata=req.metadata or {}, store=self.store is not None,
            previous_response_id=req.previous_response_id, truncation=req.truncation or "disabled",
            background=bool(req.background), service_tier=req.service_tier or "auto",
            max_tool_calls=req.max_tool_calls, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty)

    def failed(self, builder: ItemBuilder, err: OpenAIError) -> ResponseObject:
        """OpenAI's failed response: the items streamed so far, ``error`` {code, message}
        with one of OpenAI's codes: ``server_error`` for a 5xx (a request the engine failed:
        vLLM's "Internal server error"), ``invalid_prompt`` for a refusal of the request."""
        response = self.response(builder, None, "failed")
        response.error = {"code": "server_error" if err.status >= 500 else "invalid_prompt",
                          "message": err.message}
        return response

    def keep(self, response: ResponseObject) -> ResponseObject:
        """The response (finished, or a background one's state), stored when it is to be kept;
        a cancelled background response stays cancelled."""
        if self.store is not None:
            kept = self.store.get(response.id)
            if kept is None or kept.response.get("status") != "cancelled":
                self.store.put(response.id, StoredResponse(input_items(self.req), response.model_dump(),
                                                           self.req.previous_response_id))
        return response

    def usage(self, builder: Optional[ItemBuilder], out: RequestOutput) -> ResponseUsage:
        prompt, output = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
        return ResponseUsage(input_tokens=prompt, output_tokens=output, total_tokens=prompt + output,
                             input_tokens_details=InputTokensDetails(cached_tokens=out.num_cached_tokens),
                             output_tokens_details=OutputTokensDetails(
                                 reasoning_tokens=self._reasoning_tokens(builder)))

    def _reasoning_tokens(self, builder: Optional[ItemBuilder]) -> int:
        """The reasoning items' text, re-tokenized (the engine counts tokens, not channels)."""
        text = "".join(part.text for item in (builder.items if builder else []) if item.type == "reasoning"
                       for part in item.content)
        tok = self.engine.tokenizer
        return len(tok.encode(text, add_special_tokens=False)) if text and tok is not None else 0


async def _events(engine: AsyncLLM, sub: Submitted, result: _Result, heartbeat: float):
    """The stream: chat chunks (the chat path's own stream renderer) turned into item events."""
    chunks, builder, seq = result.job.chunks(), ItemBuilder(), 0

    def sse(event: Event) -> str:
        nonlocal seq
        event["sequence_number"], seq = seq, seq + 1
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    try:
        for kind in ("response.created", "response.in_progress"):
            yield sse({"type": kind, "response": result.response(None, None, "in_progress").model_dump()})
        async for item in iterate_streams(sub.streams, sub.event, heartbeat):
            if item is None:
                yield ": keep-alive\n\n"
                continue
            raise_if_error(item[1])
            for chunk in chunks.update(*item):
                for event in _chunk_events(builder, chunk):
                    yield sse(event)
        out = chunks.final
        for event in builder.finish(result.item_status(out)):
            yield sse(event)
        final = result.response(builder, out)
        final.kv_transfer_params = getattr(out, "kv_transfer_params", None)  # as a whole response's
        final = result.keep(final)
        yield sse({"type": f"response.{final.status}", "response": final.model_dump()})
    except Exception as exc:  # noqa: BLE001 - becomes the stream's last events
        err = engine_error(exc)
        code = str(err.code) if err.code is not None else None  # the event's code is a string
        yield sse({"type": "error", "code": code, "message": err.message, "param": err.param})
        failed = result.keep(result.failed(builder, err))  # GET /v1/responses/{id} answers it, as OpenAI
        yield sse({"type": "response.failed", "response": failed.model_dump()})
    finally:
        sub.abort(engine)  # never awaits: safe while being cancelled


def _chunk_events(builder: ItemBuilder, chunk) -> list[Event]:
    events: list[Event] = []
    for choice in chunk.choices:
        delta = choice.delta
        if delta.reasoning:
            events += builder.reasoning(delta.reasoning)
        logprobs = _logprobs(choice)
        if delta.content or logprobs:
            events += builder.text(delta.content or "", logprobs)
        for piece in delta.tool_calls or []:
            events += builder.call(piece.index, piece.id, piece.function.name if piece.function else None,
                                   (piece.function.arguments or "") if piece.function else "")
    return events
