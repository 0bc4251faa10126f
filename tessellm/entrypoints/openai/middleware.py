"""The edge: header and body size limits (a body over the limit is answered 413 before it is
parsed), the API key (on ``/v1`` paths, as vLLM: ``needs_api_key``), and the lifecycle (503 while draining; ``in_flight``), before any route runs.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which buffers streaming
responses and hides client disconnects). The body is read here, checked against the limit, and
replayed to the app; after that ``receive`` passes straight through, so the app still sees
``http.disconnect`` when a client goes away mid-stream.

An exception no route handled becomes a 500 OpenAI error object here, and is not raised further:
Starlette's outermost ``ServerErrorMiddleware`` would answer it too but then re-raise, and the
server (uvicorn) closes a connection whose app raised, so a keep-alive client would find its
next request on a dead socket. Only when the response had already started (a stream) is the
exception raised on: then closing the connection is the one way to tell the client.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Optional, Sequence

from tessellm.entrypoints.openai.errors import OpenAIError
from tessellm.entrypoints.openai.lifecycle import Lifecycle
from tessellm.entrypoints.openai.server_config import ServerConfig
from tessellm.entrypoints.openai.sleep_routes import DEV_PATHS

logger = logging.getLogger(__name__)


def bearer_key_ok(authorization: str, keys: Sequence[str]) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer K`` for one of ``keys`` (the plain
    server's check and the Ray Serve ingress's). Every key is compared in constant time, with no
    early exit: the time taken says nothing about which key matched, or how much of one."""
    scheme, _, token = authorization.partition(" ")
    given = token.strip().encode()
    matches = [secrets.compare_digest(given, k.encode()) for k in keys]
    return scheme.lower() == "bearer" and any(matches)


def needs_api_key(method: str, path: str) -> bool:
    """Whether a request must bear the API key (when the server has one): vLLM's rule, its
    AuthenticationMiddleware's, so a vLLM deployment's clients and probes work unchanged: paths
    under ``/v1`` (``/invocations``, ``/tokenize``, ``/pooling``, the health routes are open),
    and never an ``OPTIONS`` (a CORS preflight carries no credentials). Stricter than vLLM in
    one thing: the dev-mode routes (``/sleep``, ``/load_weights``, ...: ``DEV_PATHS``) keep the
    key, as docs/sleep_mode.md promises. ``path``: as the routes see it, --root-path's prefix off."""
    return method != "OPTIONS" and (path.startswith("/v1") or path in DEV_PATHS)


_STORED_RESPONSE = re.compile(r"/v1/responses/[^/]+(/cancel)?")


def _reads_a_response(scope, path: str) -> bool:
    """GET / DELETE ``/v1/responses/{id}`` or POST its ``/cancel``: served while draining (they
    start no work), so a background response's client can still read or stop it (lifecycle.py)."""
    match = _STORED_RESPONSE.fullmatch(path)
    if match is None:
        return False
    return scope["method"] == "POST" if match.group(1) else scope["method"] in ("GET", "DELETE")


class EdgeMiddleware:
    def __init__(self, app, config: ServerConfig, lifecycle: Optional[Lifecycle] = None):
        self.app = app
        self.config = config
        self.lifecycle = lifecycle or Lifecycle()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        open_path = self._route_path(scope) in self.config.open_paths
        if self.lifecycle.draining and not open_path and not _reads_a_response(scope, self._route_path(scope)):
            retry = self.lifecycle.retry_after_s
            return await _send_error(send, OpenAIError(
                f"The server is shutting down; retry in {retry} s (on another replica).", 503, None,
                "shutting_down", retry_after=retry))
        error = self._check_headers(scope)
        if error is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, error = await self._read_body(scope, receive)
            if error is None:
                receive = _replay(body, receive)
        if error is not None:
            return await _send_error(send, error)
        if open_path:
            return await _run_app(self.app, scope, receive, send)
        self.lifecycle.in_flight += 1
        try:
            return await _run_app(self.app, scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1

    def _route_path(self, scope) -> str:
        """The path a route sees: --root-path's prefix off (FastAPI takes it off too)."""
        path, root = scope["path"], self.config.root_path
        return path[len(root):] if root and path.startswith(root + "/") else path

    def _check_headers(self, scope):
        limit = self.config.max_header_bytes
        size = sum(len(k) + len(v) for k, v in scope["headers"])
        if size > limit:
            return OpenAIError(f"The request headers are {size} bytes; this server accepts at most "
                               f"{limit} bytes of headers (--max-header-bytes).", 400, None,
                               "headers_too_large")
        if self.config.api_key is None or not needs_api_key(scope["method"], self._route_path(scope)):
            return None
        return self._check_key(scope)

    def _check_key(self, scope):
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if not auth:
            return OpenAIError("You didn't provide an API key. Send it in the Authorization header "
                               "as 'Bearer YOUR_KEY'.", 401, None, "missing_api_key")
        if not bearer_key_ok(auth, (self.config.api_key, *self.config.extra_api_keys)):
            return OpenAIError("Incorrect API key provided.", 401, None, "invalid_api_key")
        return None

    async def _read_body(self, scope, receive):
        limit = self.config.max_body_bytes
        too_big = OpenAIError(f"The request body is larger than this server's limit of {limit} bytes "
                              "(--max-request-body-bytes); send a smaller request.", 413, None,
                              "request_too_large")
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return b"", too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", OpenAIError("The client disconnected.", 400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


async def _run_app(app, scope, receive, send) -> None:
    """The app; an exception before the response started is answered with a 500 (see above)."""
    started = False

    async def tracked_send(message):
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        await app(scope, receive, tracked_send)
    except Exception as exc:  # noqa: BLE001
        if started:
            raise
        logger.exception("Unhandled error in %s %s", scope["method"], scope["path"])
        await _send_error(send, OpenAIError(f"Internal error: {type(exc).__name__}: {exc}", 500))


class RequestIdHeaderMiddleware:
    """vLLM's --enable-request-id-headers: every response carries ``X-Request-Id``, the
    request's own when it sent one, else a new one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import uuid

        given = dict(scope["headers"]).get(b"x-request-id")
        value = given if given else uuid.uuid4().hex.encode()

        async def with_id(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", value)]}
            await send(message)

        return await self.app(scope, receive, with_id)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send, error: OpenAIError) -> None:
    import json

    payload = json.dumps(error.body()).encode()
    headers = [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})
