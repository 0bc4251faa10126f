"""Sleep mode's dev routes in process (the app over a real AsyncLLM and engine core process, a
tiny Llama): off without TESSELLM_SERVER_DEV_MODE=1; /sleep, /is_sleeping, /wake_up (with tags)
and /load_weights; completions answer 503 with an OpenAI error object while the engine sleeps
and the same tokens after it wakes; bad levels, tags and paths are 400s naming the problem."""

from __future__ import annotations

import asyncio

from tessellm.config import EngineArgs
from tests.server.in_process import serve

BODY = {"model": "m", "prompt": [1, 5, 9, 22, 33, 44, 55, 66, 77, 88, 99, 100, 120, 130, 140, 150, 160, 170],
        "max_tokens": 6, "temperature": 0, "return_token_ids": True}


def _ids(r) -> list[int]:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_sleep_routes(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TESSELLM_SERVER_DEV_MODE", "1")
    path = tiny_model_dir("llama")

    async def scenario(c, engine):
        before = _ids(await c.post("/v1/completions", json=BODY))
        assert (await c.get("/is_sleeping")).json() == {"is_sleeping": False}
        assert (await c.post("/sleep", params={"level": 1})).status_code == 200
        assert (await c.get("/is_sleeping")).json() == {"is_sleeping": True}
        r = await c.post("/v1/completions", json=BODY)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "engine_asleep" and "wake_up" in r.json()["error"]["message"]
        assert (await c.post("/wake_up", params={"tags": "weights"})).status_code == 200
        assert (await c.get("/is_sleeping")).json() == {"is_sleeping": True}
        assert (await c.post("/wake_up", params={"tags": "kv_cache"})).status_code == 200
        assert (await c.get("/is_sleeping")).json() == {"is_sleeping": False}
        assert _ids(await c.post("/v1/completions", json=BODY)) == before
        r = await c.post("/sleep", params={"level": 5})
        assert r.status_code == 400 and "level must be 1" in r.json()["error"]["message"]
        r = await c.post("/wake_up", params={"tags": "gpu"})
        assert r.status_code == 400 and "Unknown wake_up tag" in r.json()["error"]["message"]
        r = await c.post("/load_weights", json={"path": "/nonexistent"})
        assert r.status_code == 400, r.text
        (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)  # not safetensors: a 400, the engine lives
        r = await c.post("/load_weights", json={"path": str(tmp_path)})
        assert r.status_code == 400 and "does not read as safetensors" in r.text, r.text
        assert (await c.post("/sleep", params={"level": 2})).status_code == 200
        assert (await c.post("/wake_up", params={"tags": "weights"})).status_code == 200
        r = await c.post("/load_weights", json={"path": path})
        assert r.status_code == 200 and r.json()["loaded"] > 0
        assert (await c.post("/wake_up")).status_code == 200
        assert (await c.post("/reset_prefix_cache")).status_code == 200
        r = await c.post("/reset_prefix_cache", params={"reset_running_requests": "true"})  # vLLM's
        assert r.status_code == 200, r.text
        assert _ids(await c.post("/v1/completions", json=BODY)) == before
        await engine.sleep(1)  # vLLM's AsyncLLM methods, as the routes call them
        assert await engine.is_sleeping()
        await engine.wake_up()
        assert not await engine.is_sleeping() and await engine.reset_prefix_cache()
        assert await engine.reset_prefix_cache(reset_running_requests=True)
        assert _ids(await c.post("/v1/completions", json=BODY)) == before

    asyncio.run(serve(EngineArgs(model=path, device="cpu", num_kv_blocks=64, enable_sleep_mode=True),
                      scenario, with_engine=True))


def test_sleep_routes_off_without_dev_mode(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("TESSELLM_SERVER_DEV_MODE", raising=False)

    async def scenario(c, engine):
        assert (await c.post("/sleep")).status_code == 404
        assert (await c.get("/is_sleeping")).status_code == 404

    asyncio.run(serve(EngineArgs(model=tiny_model_dir("llama"), device="cpu", num_kv_blocks=16), scenario,
                      with_engine=True))


def test_dev_routes_need_the_api_key():
    """The key guards vLLM's /v1 paths only (middleware.needs_api_key), but the dev-mode routes,
    which sleep the engine or load weights from a path, keep it (docs/sleep_mode.md: "behind
    the API key"): without it each is a 401 and reaches no engine; with it the route runs. Every
    route add_sleep_routes adds is one of DEV_PATHS, so a new one cannot come unguarded. The
    edge and the routes are the server's own; the engine is a recorder (no model needed)."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from tessellm.entrypoints.openai.api_server import _json_body, add_error_handling
    from tessellm.entrypoints.openai.lifecycle import Lifecycle
    from tessellm.entrypoints.openai.server_config import ServerConfig
    from tessellm.entrypoints.openai.sleep_routes import DEV_PATHS, add_sleep_routes

    class Recorder:
        def __init__(self):
            self.calls = []

        async def core_call(self, method, *args):
            self.calls.append(method)
            return 1

    app, engine = FastAPI(), Recorder()
    add_sleep_routes(app, engine, _json_body)
    assert {r.path for r in app.routes if r.path in DEV_PATHS or "sleep" in r.path} == DEV_PATHS
    add_error_handling(app, ServerConfig(["m"], api_key="k", root_path="/api"), Lifecycle())
    routes = [(next(iter(r.methods)), r.path) for r in app.routes if r.path in DEV_PATHS]
    with TestClient(app) as client:
        for method, path in routes:
            for prefix in ("", "/api"):  # as sent, and behind a proxy that keeps --root-path
                for headers in ({}, {"Authorization": "Bearer wrong"}):
                    r = client.request(method, prefix + path, json={"path": "/x"}, headers=headers)
                    assert r.status_code == 401, (method, prefix + path, r.status_code)
        assert engine.calls == []
        for method, path in routes:
            r = client.request(method, path, json={"path": "/x"}, headers={"Authorization": "Bearer k"})
            assert r.status_code == 200, (path, r.text)
    assert sorted(engine.calls) == sorted(["sleep", "wake_up", "is_sleeping", "reset_prefix_cache",
                                           "load_weights_from_path"])
