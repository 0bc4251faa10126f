"""vLLM's profiler routes, offered as vLLM offers them: only when a trace directory is set
(``TESSELLM_TORCH_PROFILER_DIR``, or vLLM's ``VLLM_TORCH_PROFILER_DIR``).

    POST /start_profile     torch.profiler on every rank of every engine core
    POST /stop_profile      stop it; each rank's Chrome trace lands in that directory

Behind the API key like every route; a second start (or a stop with none running) is a 400."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response

from tessellm.entrypoints.openai.errors import bad_request


def add_profile_routes(app: FastAPI, engine) -> None:
    async def call(method: str) -> None:
        try:
            await engine.core_call(method)
        except ValueError as exc:
            raise bad_request(str(exc)) from None

    @app.post("/start_profile")
    async def start_profile():
        await call("start_profile")
        return Response(status_code=200)

    @app.post("/stop_profile")
    async def stop_profile():
        await call("stop_profile")
        return Response(status_code=200)
