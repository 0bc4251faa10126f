"""Background responses' bookkeeping without a server: the store never drops a background
response still running (it stays readable, cancellable, deletable), a run cancelled before its
task took a step still ends (followers told, its engine request aborted), and followers of a
recorded stream each get every event, in order, from where they start."""

from __future__ import annotations

import asyncio

from tessellm.entrypoints.openai.responses.background import BackgroundRun
from tessellm.entrypoints.openai.responses.store import ResponseStore, StoredResponse


def _stored(status: str) -> StoredResponse:
    return StoredResponse([], {"status": status, "output": []}, None)


def test_store_keeps_a_running_background_response_past_capacity():
    async def main():
        store = ResponseStore(2)
        gate = asyncio.Event()
        run = BackgroundRun("resp_bg", streamed=False)
        store.runs["resp_bg"] = run
        store.put("resp_bg", _stored("in_progress"))
        run.start(gate.wait())
        for rid in ("resp_a", "resp_b", "resp_c"):  # three more than the oldest: it is the LRU one
            store.put(rid, _stored("completed"))
        assert store.get("resp_bg") is not None and "resp_bg" in store.runs
        assert store.get("resp_a") is None and store.get("resp_b") is None  # the others went instead
        gate.set()
        await run.task
        assert not run.running
        store.put("resp_d", _stored("completed"))  # ended: an ordinary response now
        store.get("resp_d")
        store.put("resp_e", _stored("completed"))
        assert store.get("resp_bg") is None and "resp_bg" not in store.runs
        assert len(store._items) == 2

    asyncio.run(main())


def test_run_cancelled_before_its_first_step_ends():
    async def main():
        run, started, aborted = BackgroundRun("resp_x", streamed=True), [], []

        async def work():
            started.append(True)

        run.start(work(), on_end=lambda: aborted.append(True))
        await run.cancel()  # before the loop ran the task once
        assert run.done and not run.running
        assert started == [] and aborted == [True]
        followed = [e async for e in run.follow(0, heartbeat=None)]  # ends at once, never hangs
        assert followed == []

    asyncio.run(asyncio.wait_for(main(), 5))


def test_run_cancelled_midway_aborts_once():
    async def main():
        run, aborted = BackgroundRun("resp_y", streamed=False), []
        run.start(asyncio.sleep(60), on_end=lambda: aborted.append(True))
        await asyncio.sleep(0.01)
        await run.cancel()
        await run.cancel()
        assert run.done and aborted == [True]

    asyncio.run(asyncio.wait_for(main(), 5))


def test_followers_get_every_event_in_order():
    async def main():
        run = BackgroundRun("resp_z", streamed=True)
        feed: asyncio.Queue = asyncio.Queue()

        async def events():
            while (text := await feed.get()) is not None:
                yield text

        run.start(run.record(events()))

        async def follow(first):
            return [e async for e in run.follow(first, heartbeat=None)]

        a, b = asyncio.create_task(follow(0)), asyncio.create_task(follow(3))
        for i in range(6):
            await feed.put(f"e{i}")
            await asyncio.sleep(0)
            if i == 2:
                late = asyncio.create_task(follow(1))  # joins midway: the recorded ones first
        await feed.put(None)
        assert await a == [f"e{i}" for i in range(6)]
        assert await b == ["e3", "e4", "e5"]
        assert await late == [f"e{i}" for i in range(1, 6)]

    asyncio.run(asyncio.wait_for(main(), 5))


def test_only_reads_and_cancels_of_stored_responses_pass_a_drain():
    from tessellm.entrypoints.openai.middleware import _reads_a_response

    served = [("GET", "/v1/responses/resp_1"), ("DELETE", "/v1/responses/resp_1"),
              ("POST", "/v1/responses/resp_1/cancel")]
    refused = [("POST", "/v1/responses"), ("POST", "/v1/responses/resp_1"), ("GET", "/v1/responses/resp_1/cancel"),
               ("GET", "/v1/responses"), ("POST", "/v1/chat/completions"), ("GET", "/v1/responses/a/b")]
    assert [_reads_a_response({"method": m}, p) for m, p in served] == [True] * 3
    assert [_reads_a_response({"method": m}, p) for m, p in refused] == [False] * 6
