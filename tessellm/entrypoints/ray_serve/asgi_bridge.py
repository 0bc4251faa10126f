"""Run one HTTP request through an in-process ASGI app and stream its response as plain data.

An engine replica serves the exact same FastAPI app as ``tessellm serve`` (routes, OpenAI
errors, API key and size limits, SSE), but its requests arrive as Ray calls, not sockets. This
turns a ``ForwardedRequest`` into an ASGI call and the app's ``send`` messages into items a
Ray streaming call can carry::

    ingress --ForwardedRequest--> replica: app(scope, receive, send)
            <--("start", status, headers)-- http.response.start
            <--("body", bytes, more)------- http.response.body (one item per SSE event)

``receive`` gives the body once, then waits. If the consumer stops (client gone, Ray call
cancelled), the generator is closed: ``receive`` then answers ``http.disconnect`` and the app
task is cancelled, so the serving code aborts its engine requests as it does for a socket.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator


@dataclass
class ForwardedRequest:
    """What the ingress forwards: the HTTP request, unparsed."""

    method: str
    path: str  # without the route prefix, e.g. "/v1/completions"
    query_string: bytes
    headers: list[tuple[bytes, bytes]]  # lower-case names, as ASGI has them
    body: bytes
    client: tuple[str, int] = ("ray-serve-ingress", 0)


async def stream_asgi(app, request: ForwardedRequest) -> AsyncIterator[tuple]:
    """Yield ``("start", status, headers)`` then ``("body", bytes, more_body)`` items."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": request.method, "scheme": "http", "path": request.path,
             "raw_path": request.path.encode(), "query_string": request.query_string,
             "root_path": "", "headers": list(request.headers), "client": request.client,
             "server": ("tessellm-replica", 0)}
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            messages.put_nowait(None)

    task = asyncio.get_running_loop().create_task(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                yield ("start", message["status"], headers)
            elif message["type"] == "http.response.body":
                body, more = message.get("body", b""), message.get("more_body", False)
                if body or not more:
                    yield ("body", bytes(body), more)
        await task  # the app's own exception, if it raised instead of answering
    finally:
        if not task.done():
            gone.set()
            task.cancel()
