"""Ready means warm: /ready is 503 (Retry-After) until the engine core's warm-up has ended.

In-process: the app's /ready only turns 200 once the front end has read the core's "warm"
message, which the core sends after its warm-up steps; before the output handler runs it cannot
have read it, so the first answer is 503 whatever the timing.
"""

from __future__ import annotations

import asyncio
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
    finally:
        await engine.shutdown()


def test_ready_only_after_warmup():
    asyncio.run(_scenario())
