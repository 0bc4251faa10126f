"""vLLM's profiler routes in process (the app over a real AsyncLLM and engine core process, a
tiny Llama): offered only with a trace directory (VLLM_TORCH_PROFILER_DIR, as vLLM; and vLLM's
VLLM_SERVER_DEV_MODE turns on the dev routes); start,
a completion, stop leaves a Chrome trace of rank 0 there; a stop with none running is a 400.
vLLM's routes not offered (no trace directory, dev mode off, speech-to-text) are 404s that say
why and what to do."""

from __future__ import annotations

import asyncio
import json

from tessellm.config import EngineArgs
from tests.server.in_process import serve

BODY = {"model": "m", "prompt": [1, 5, 9, 22], "max_tokens": 3, "temperature": 0}


def test_profile_routes_write_traces(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("TESSELLM_TORCH_PROFILER_DIR", raising=False)
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path))  # vLLM's names work
    monkeypatch.delenv("TESSELLM_SERVER_DEV_MODE", raising=False)
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")

    async def scenario(c):
        assert (await c.get("/is_sleeping")).json() == {"is_sleeping": False}
        r = await c.post("/stop_profile")
        assert r.status_code == 400 and "start_profile" in r.json()["error"]["message"]
        assert (await c.post("/start_profile")).status_code == 200
        assert (await c.post("/v1/completions", json=BODY)).status_code == 200
        assert (await c.post("/stop_profile")).status_code == 200

    asyncio.run(serve(EngineArgs(model=tiny_model_dir("llama"), device="cpu", num_kv_blocks=16), scenario))
    (trace,) = tmp_path.glob("rank0.pid*.trace.json")
    assert json.loads(trace.read_text())["traceEvents"]


def test_routes_not_offered_say_why(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("TESSELLM_TORCH_PROFILER_DIR", raising=False)
    monkeypatch.delenv("VLLM_TORCH_PROFILER_DIR", raising=False)
    monkeypatch.delenv("TESSELLM_SERVER_DEV_MODE", raising=False)
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)

    async def scenario(c):
        r = await c.post("/start_profile")  # a 404 naming the route and the variable to set
        assert r.status_code == 404 and "TESSELLM_TORCH_PROFILER_DIR" in r.json()["error"]["message"]
        r = await c.post("/v1/audio/translations")
        assert r.status_code == 404 and "does not translate speech" in r.json()["error"]["message"]
        r = await c.post("/sleep")  # dev mode off
        assert r.status_code == 404 and "VLLM_SERVER_DEV_MODE" in r.json()["error"]["message"]
        assert (await c.get("/no/such/route")).json()["error"]["message"] == "Not Found"

    asyncio.run(serve(EngineArgs(model=tiny_model_dir("llama"), device="cpu", num_kv_blocks=16), scenario))
