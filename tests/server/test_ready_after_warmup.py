"""Ready means warm: /ready is 503 (Retry-After) until the engine core's warm-up has ended.

In-process: the app's /ready only turns 200 once the front end has read the core's "warm"
message, which the core sends after its warm-up steps; before the output handler runs it cannot
have read it, so the first answer is 503 whatever the timing. Once warm, a core that is alive
but does not answer (here: stopped with SIGSTOP, as a core stuck in a long step would be) makes
/ready a 503 "not ready" that says to retry, not one that says the engine is gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx

from tessellm.config import EngineArgs
from tessellm.entrypoints.async_llm import AsyncLLM
from tessellm.entrypoints.openai.api_server import build_app
from tessellm.entrypoints.openai.server_config import ServerConfig


async def _scenario():
    engine = AsyncLLM(EngineArgs(max_model_len=256, num_kv_blocks=64, max_num_seqs=8))
    try:
        app = build_app(engine, ServerConfig(["m"]))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "warming up", r.text
            assert int(r.headers["retry-after"]) > 0
            assert (await c.get("/health")).status_code == 200  # liveness meanwhile
            engine.start()
            deadline = time.monotonic() + 120
            while (await c.get("/ready")).status_code != 200:
                assert time.monotonic() < deadline, "never ready"
                await asyncio.sleep(0.05)
            report = (await c.get("/debug/stats")).json()["warmup"]
            assert report["requests"] >= 1 and report["steps"] >= 1, report
            metrics = (await c.get("/metrics")).text
            assert 'tessellm:triton_compilations_after_ready{model_name="m"} 0.0' in metrics
            await _unanswering_core_is_not_ready_for_now(c, engine)
    finally:
        await engine.shutdown()


async def _unanswering_core_is_not_ready_for_now(c: httpx.AsyncClient, engine: AsyncLLM) -> None:
    """The core alive and warm but silent past /ready's ping wait (10 s): 503 "not ready" with
    Retry-After 5 (it may come back), /health still 200; answering again, /ready is 200."""
    [pid] = engine.cores.pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        r = await c.get("/ready", timeout=60)
        assert (await c.get("/health")).status_code == 200  # alive: a probe must not restart it
    finally:
        os.kill(pid, signal.SIGCONT)
    assert r.status_code == 503 and r.json() == {"status": "not ready", "reason": "no answer"}, r.text
    assert r.headers["retry-after"] == "5"
    assert (await c.get("/ready", timeout=60)).status_code == 200


def test_ready_only_after_warmup():
    asyncio.run(_scenario())
