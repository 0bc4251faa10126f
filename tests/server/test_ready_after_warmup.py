"""Ready means warm: /ready is 503 (Retry-After) until the engine core's warm-up has ended.

In-process: the app's /ready only turns 200 once the front end has read the core's "warm"
message, which the core sends after its warm-up steps; before the output handler runs it cannot
have read it, so the first answer is 503 whatever the timing. Once warm, an idle core that is
alive but does not answer (here: stopped with SIGSTOP, as a stuck core would be) makes /ready a
503 "not ready" that says to retry, not one that says the engine is gone. A busy core in a long
step (SIGSTOP mid-generation) gets a 200 at once, without waiting for its answer, until its ping
has waited ``stuck_after_s``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx

from tessellm.config import EngineArgs
from tessellm.core.sampling_params import SamplingParams
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
            await _busy_core_is_ready_at_once(c, engine)
    finally:
        await engine.shutdown()


async def _unanswering_core_is_not_ready_for_now(c: httpx.AsyncClient, engine: AsyncLLM) -> None:
    """The core alive, warm and idle but silent past /ready's ping wait (0.5 s): 503 "not ready"
    with Retry-After 5 (it may come back), /health still 200; answering again, /ready is 200."""
    [pid] = engine.cores.pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        r = await c.get("/ready", timeout=60)
        assert (await c.get("/health")).status_code == 200  # alive: a probe must not restart it
    finally:
        os.kill(pid, signal.SIGCONT)
    assert r.status_code == 503 and r.json() == {
        "status": "not ready", "reason": "the engine core is idle but did not answer a ping within 0.5 s"}, r.text
    assert r.headers["retry-after"] == "5"
    assert (await c.get("/ready", timeout=60)).status_code == 200


async def _busy_core_is_ready_at_once(c: httpx.AsyncClient, engine: AsyncLLM) -> None:
    """A generation in flight and its core frozen (SIGSTOP: a step that takes seconds): past the
    second in which its outputs vouch for it, /ready pings it and answers 200 while the ping is
    still unanswered (it could not have waited for the core); once the ping has waited
    ``stuck_after_s``, 503 "not ready" with Retry-After. Let go, the core finishes the request
    whole and /ready is 200 again."""
    gen = engine.generate("Once upon a time", SamplingParams(max_tokens=200, ignore_eos=True, temperature=0))
    await gen.__anext__()
    [pid] = engine.cores.pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(1.2)  # its last output is over a second old
        assert engine.cores.loads() == [1], "the generation ended before the core was stopped"
        r = await c.get("/ready", timeout=60)
        assert r.status_code == 200 and r.json() == {"status": "ready"}, r.text
        assert 0 in engine._pings  # /ready's ping to the frozen core: not answered
        await _probe_storm_shares_one_ping(c, engine)
        engine.stuck_after_s = 1.0
        await asyncio.sleep(1.0)
        r = await c.get("/ready", timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert r.json()["reason"].startswith("the engine core is busy and has not answered for "), r.text
        assert (await c.get("/health")).status_code == 200
    finally:
        os.kill(pid, signal.SIGCONT)
        engine.stuck_after_s = 10.0
    outputs = [out async for out in gen]
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 200
    assert (await c.get("/ready", timeout=60)).status_code == 200
    storm = await asyncio.gather(*(c.get("/ready", timeout=60) for _ in range(40)))
    assert [r.status_code for r in storm] == [200] * 40
    assert engine._pings == {} and engine._calls == {}  # answered pings leave nothing behind


async def _probe_storm_shares_one_ping(c: httpx.AsyncClient, engine: AsyncLLM) -> None:
    """40 probes at once at a frozen busy core: every one 200, all on the one ping already in
    flight (no call, ping or task left per probe)."""
    ping, calls, tasks = engine._pings[0], len(engine._calls), len(asyncio.all_tasks())
    storm = await asyncio.gather(*(c.get("/ready", timeout=60) for _ in range(40)))
    assert [r.status_code for r in storm] == [200] * 40, [r.text for r in storm if r.status_code != 200]
    assert engine._pings == {0: ping} and len(engine._calls) == calls
    assert len(asyncio.all_tasks()) == tasks


def test_ready_only_after_warmup():
    asyncio.run(_scenario())
