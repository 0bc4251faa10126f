"""Sleep mode's development routes (vLLM's, there behind VLLM_SERVER_DEV_MODE=1; here
TESSELLM_SERVER_DEV_MODE=1), and the refusal of requests while the engine sleeps.

    POST /sleep?level=1|2            free the weights (1: to host memory; 2: discarded) and KV cache
    POST /wake_up[?tags=weights&tags=kv_cache]   bring them back (no tags: both)
    GET  /is_sleeping                {"is_sleeping": bool}
    POST /reset_prefix_cache         empty the prefix cache (?reset_running_requests=true: preempt first)
    POST /load_weights  {"path": dir}   new weights from safetensors files (every rank reads them)

Behind the API key (``DEV_PATHS``: the edge keys them though they are not ``/v1`` paths; vLLM
leaves them open). While any part sleeps, inference routes answer 503 with an
OpenAI error object (``check_awake``); the engine core refuses such a request too.
"""

from __future__ import annotations

from typing import Optional

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from tessellm.entrypoints.openai.errors import OpenAIError, bad_request

# The routes add_sleep_routes adds: they change or free the model, so the API key guards them
# (middleware.needs_api_key) as it guards /v1.
DEV_PATHS = frozenset({"/sleep", "/wake_up", "/is_sleeping", "/reset_prefix_cache", "/load_weights"})


def check_awake(engine) -> None:
    if getattr(engine, "sleeping", False):
        raise OpenAIError("The engine is asleep (sleep mode); POST /wake_up before sending requests.",
                          503, None, "engine_asleep")


def add_sleep_routes(app: FastAPI, engine, read_body) -> None:
    async def call(method: str, *args):
        try:
            return await engine.core_call(method, *args)
        except ValueError as exc:
            raise bad_request(str(exc)) from None

    @app.post("/sleep")
    async def sleep(level: int = Query(1)):
        await call("sleep", level)
        return Response(status_code=200)

    @app.post("/wake_up")
    async def wake_up(tags: Optional[list[str]] = Query(None)):
        await call("wake_up", tags)
        return Response(status_code=200)

    @app.get("/is_sleeping")
    async def is_sleeping():
        return JSONResponse({"is_sleeping": await call("is_sleeping")})

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(reset_running_requests: bool = Query(False)):
        # vLLM's query parameter: the running requests are preempted (and recomputed) first
        if not await call("reset_prefix_cache", *([True] if reset_running_requests else [])):
            raise bad_request("Requests hold KV blocks; reset the prefix cache once they finish, or "
                              "POST /reset_prefix_cache?reset_running_requests=true to preempt them.")
        return Response(status_code=200)

    @app.post("/load_weights")
    async def load_weights(request: Request):
        body = await read_body(request)
        path = body.get("path") if isinstance(body, dict) else None
        if not isinstance(path, str) or not path:
            raise bad_request("POST /load_weights takes {\"path\": a directory of .safetensors files}.", "path")
        return JSONResponse({"loaded": await call("load_weights_from_path", path)})
