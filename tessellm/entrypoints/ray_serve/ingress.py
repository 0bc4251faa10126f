"""The HTTP ingress: an OpenAI-compatible FastAPI front that forwards to engine replicas.

It parses nothing but the prompt prefix and the ``model`` (for routing, prefix_key.py; a
request for a served LoRA adapter goes out with the adapter as its Serve multiplexed model id,
as ``serve_multiplexed_model_id`` would set it): every request, raw, goes to an engine replica
through a streaming DeploymentHandle call, and the replica's response
(status, headers, body chunks) streams back as it comes. So the replica's app decides
everything an OpenAI client sees, as with ``tessellm serve``.

Failures of the replica, not of the request:

* it died (or became unreachable) before sending anything back: the request is sent again, to
  another replica, up to ``ingress.retries`` times; then 503 ``replica_unavailable``;
* it died mid-stream: an SSE stream ends with an OpenAI error event and ``data: [DONE]``; a
  plain body, already started, is cut short (the client sees a broken response, never a hang);
* Serve refused it (``max_queued_requests`` reached): 503 ``overloaded``, not retried.

Draining (``tessellm serve --ray`` got SIGTERM / Ctrl-C and called ``drain()``, or an operator
set the deployment's ``user_config: {draining: true}``, which Serve hands every ingress replica
through ``reconfigure``): new requests get 503 ``server_shutting_down`` with ``Retry-After``;
requests in flight, streams included, go on. ``drain()`` / ``drain_status()`` answer how many
are left (a response counts until its last byte is sent or its client is gone).

The FastAPI app below is a route table only (Serve's class-based ingress); its state lives
on the ``OpenAIIngress`` instance. Serve pickles the app when the class is decorated, so every
helper a route uses is defined above the class.
"""

import logging  # no `from __future__ import annotations`: FastAPI must see the real Request type
import math
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from tessellm.entrypoints.openai.errors import OpenAIError
from tessellm.entrypoints.openai.middleware import bearer_key_ok, needs_api_key
from tessellm.entrypoints.ray_serve.asgi_bridge import ForwardedRequest
from tessellm.entrypoints.ray_serve.config import parse_config
from tessellm.entrypoints.ray_serve.engine_replica import REPLICA_HEADER
from tessellm.entrypoints.ray_serve.prefix_key import route_info

logger = logging.getLogger(__name__)

_HOP_HEADERS = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te",
                b"proxy-connection"}
_RESPONSE_DROP = _HOP_HEADERS | {b"content-length"}
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
# Retry-After of the 503s below: a queue slot frees as a request finishes (a second or so);
# the request already went to other replicas ``retries`` times, and Serve routes the next
# one to a live replica once it has seen this one gone (a second or so too).
_OVERLOADED_RETRY_S = 1
_LOST_RETRY_S = 1

app = FastAPI(title="tessellm (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)


class ReplicaLost(Exception):
    """The replica failed before answering anything: the request may be sent again."""


async def _relay(gen, first: bytes, is_sse: bool):
    """The rest of a streamed body; a replica failure mid-stream ends it with an error event."""
    finished = False
    try:
        yield first
        async for _, chunk, _more in gen:
            if chunk:
                yield chunk
        finished = True
    except Exception as exc:  # noqa: BLE001
        error = _replica_error(exc)
        logger.warning("Stream from an engine replica failed: %s", error.message)
        if is_sse:
            yield error.sse_event()
            yield "data: [DONE]\n\n"
    finally:
        if not finished:
            gen.cancel()  # client gone or replica failed: stop the replica's work too


class _Counted(Response):
    """Wraps a response: ``done()`` runs once it is sent or its client is gone (exactly once)."""

    def __init__(self, response: Response, done):  # noqa: super().__init__ not wanted: a proxy
        self.response, self.done = response, done

    @property
    def background(self):  # FastAPI attaches background tasks here: they belong to the inner one
        return self.response.background

    @background.setter
    def background(self, value):
        self.response.background = value

    async def __call__(self, scope, receive, send):
        try:
            await self.response(scope, receive, send)
        finally:
            self.done()


def api_keys(server) -> tuple:
    """The keys a request may bear (``server.api_key`` and ``server.extra_api_keys``, vLLM's
    ``--api-key K1 K2``); empty: no authentication."""
    return (server.api_key, *server.extra_api_keys) if server.api_key is not None else ()


def authorized(keys: tuple, authorization: str) -> bool:
    """The ingress's own routes (/debug/replica): the plain server's check, any of ``keys``
    (constant-time per key). Forwarded requests are checked by the replica's app itself."""
    return not keys or bearer_key_ok(authorization, keys)


def _replica_error(exc) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, BackPressureError):  # Serve's own Retry-After where it sets one
        wait = getattr(exc, "retry_after_s", None)
        wait = _OVERLOADED_RETRY_S if wait is None else max(1, math.ceil(wait))
        return OpenAIError(f"All engine replicas are at their queue limit; retry in {wait} s.", 503,
                           None, "overloaded", retry_after=wait)
    if isinstance(exc, (RayActorError, ActorUnavailableError)):
        return OpenAIError(f"The engine replica serving this request died or is unreachable "
                           f"({type(exc).__name__}); retry the request.", 503, None,
                           "replica_unavailable", retry_after=_LOST_RETRY_S)
    logger.error("Engine replica call failed: %r", exc)
    return OpenAIError(f"Internal error in an engine replica: {type(exc).__name__}: {exc}", 500)


@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, engine, config: dict):
        cfg = parse_config(config, check_resources=False)
        server = cfg.server_config()
        self.engine = engine  # DeploymentHandle of the engine deployment
        self.router = cfg.router
        self.retries = cfg.ingress.retries
        self.api_keys = api_keys(server)
        self.max_body_bytes = server.max_body_bytes
        # Served LoRA adapters (server.lora_modules): their requests route by adapter first.
        from tessellm.entrypoints.openai.lora_modules import parse_lora_modules

        self.lora_names = frozenset(name for name, _ in parse_lora_modules(server.lora_modules))
        self.retry_after_s = cfg.ingress.retry_after_s
        self.draining = False
        self.in_flight = 0  # requests whose response is not fully sent yet

    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this at start and on every ``user_config`` change (a light update)."""
        draining = bool((user_config or {}).get("draining", False))
        if draining and not self.draining:
            logger.info("Draining: new requests get 503; %d in flight go on.", self.in_flight)
        self.draining = draining

    def drain(self) -> dict:
        """Take no new requests from now on; returns ``drain_status()``."""
        self.reconfigure({"draining": True})
        return self.drain_status()

    def drain_status(self) -> dict:
        return {"draining": self.draining, "in_flight": self.in_flight}

    @app.get("/debug/replica")
    async def replica_info(self, request: Request):
        """One engine replica's identity and counters (whichever the router picks)."""
        if self.draining:
            return self._shutting_down()
        if not self._authorized(request):
            return OpenAIError("Incorrect or missing API key.", 401, None, "invalid_api_key").response()
        try:
            info = await self.engine.replica_info.remote()
        except Exception as exc:  # noqa: BLE001
            return _replica_error(exc).response()
        return JSONResponse(info, headers={REPLICA_HEADER.decode(): info["replica_id"]})

    @app.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, request: Request, path: str):
        if self.draining:
            return self._shutting_down()
        self.in_flight += 1
        try:
            response = await self._forward(request, path)
        except BaseException:
            self._done()
            raise
        return _Counted(response, self._done)

    def _done(self) -> None:
        self.in_flight -= 1

    def _shutting_down(self) -> Response:
        return OpenAIError("The server is shutting down and takes no new requests; retry "
                           "shortly (another instance may answer).", 503, None,
                           "server_shutting_down", retry_after=self.retry_after_s).response()

    async def _read_body(self, request: Request) -> Optional[bytes]:
        """The body, or None once it is known to exceed ``max_body_bytes``: by its
        Content-Length before reading, else while it streams in (never buffered whole)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _forward(self, request: Request, path: str):
        body = await self._read_body(request)
        if body is None:  # as the single-process server's edge answers (openai/middleware.py)
            return OpenAIError(f"The request body is larger than this server's limit of "
                               f"{self.max_body_bytes} bytes (max_body_bytes); send a smaller "
                               f"request.", 413, None, "body_too_large").response()
        forwarded = ForwardedRequest(
            request.method, "/" + path, request.scope.get("query_string", b""),
            [(k, v) for k, v in request.scope["headers"] if k not in _HOP_HEADERS], body)
        if forwarded.path.rstrip("/").endswith(("/load_lora_adapter", "/unload_lora_adapter")):
            return OpenAIError("Under Ray Serve, LoRA adapters are listed in the config's "
                               "server.lora_modules (every replica serves them); loading one at "
                               "run time would reach a single replica.", 400).response()
        r = self.router
        adapter, chain, samples = route_info(forwarded.path, body, r.chunk_chars, r.chunk_tokens,
                                             r.max_chunks, self.lora_names, hashes=r.prefix_affinity)
        last = None
        for attempt in range(self.retries + 1):
            try:
                return await self._send(forwarded, chain, adapter, samples)
            except ReplicaLost as exc:
                logger.warning("Replica lost before answering (attempt %d of %d): %s", attempt + 1,
                               self.retries + 1, exc.__cause__)
                last = exc.__cause__
            except Exception as exc:  # noqa: BLE001
                return _replica_error(exc).response()
        return _replica_error(last).response()

    async def _send(self, forwarded: ForwardedRequest, chain: list[int], adapter: str = "",
                    samples: int = 1):
        """Start the call; answer once the first body chunk is in (until then, failures retry).
        ``adapter``: the LoRA adapter the request names, its Serve multiplexed model id;
        ``samples``: the sequences it runs (``prefix_key.route_info``), for the router."""
        handle = self.engine.options(stream=True, multiplexed_model_id=adapter) if adapter else \
            self.engine.options(stream=True)
        gen = handle.handle_http.remote(forwarded, prefix_hashes=chain, num_samples=samples)
        handed_over = False
        try:
            try:
                _, status, headers = await gen.__anext__()
                _, first, more = await gen.__anext__()
            except (RayActorError, ActorUnavailableError) as exc:
                raise ReplicaLost() from exc
            except StopAsyncIteration:
                raise OpenAIError("The engine replica ended its response without a body.", 502) from None
            headers = [(k, v) for k, v in headers if k.lower() not in _RESPONSE_DROP]
            if not more:
                response = Response(first, status_code=status)
                response.raw_headers = headers + [(b"content-length", str(len(first)).encode())]
                return response
            is_sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                         for k, v in headers)
            response = StreamingResponse(_relay(gen, first, is_sse), status_code=status)
            response.raw_headers = headers
            handed_over = True
            return response
        finally:
            if not handed_over:
                gen.cancel()

    def _authorized(self, request: Request) -> bool:
        """The plain server's rule (``needs_api_key``: /v1 paths only), for the ingress's routes."""
        return (not needs_api_key(request.method, request.scope["path"])
                or authorized(self.api_keys, request.headers.get("authorization", "")))
