"""A worker process that dies makes the engine fail fast with a clear error, never hang; in
serving, the in-flight requests are answered with that error."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading

import pytest

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tessellm.distributed.executor import WorkerDiedError


def test_killed_worker_fails_generate(tiny_model_dir):
    with LLM(tiny_model_dir("llama"), device="cpu", num_kv_blocks=64,
             tensor_parallel_size=2) as llm:
        procs = llm.engine.core.executor._procs
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].join(timeout=10)
        with pytest.raises(WorkerDiedError, match=r"rank 1 .*exited"):
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], use_tqdm=False)
        # Every other worker was stopped too: nothing is left holding the device.
        assert all(p.exitcode is not None for p in procs)
        with pytest.raises(WorkerDiedError):  # and the engine stays failed, with the same reason
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], use_tqdm=False)


def test_a_failed_engine_dropped_without_shutdown_is_released_by_gc(tiny_model_dir):
    """An engine nobody shut down, garbage in a reference cycle: the collector must release its
    sockets, context, worker processes and socket files, and must not block. (pyzmq alone ran
    ``Context.term()`` after the cycle's sockets had lost their weak references, and waited for
    them forever.)"""
    llm = LLM(tiny_model_dir("llama"), device="cpu", num_kv_blocks=64, tensor_parallel_size=2)
    executor = llm.engine.core.executor
    procs, tmp = list(executor._procs), executor._tmp
    procs[0].kill()
    procs[0].join(timeout=10)
    with pytest.raises(WorkerDiedError):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], use_tqdm=False)
    cycle = [llm]
    cycle.append(cycle)  # only the cycle collector frees it
    del llm, executor, cycle
    collector = threading.Thread(target=gc.collect, daemon=True)
    collector.start()
    collector.join(timeout=60)
    assert not collector.is_alive(), "gc.collect() blocked on the dropped engine"
    assert all(p.exitcode is not None for p in procs)
    assert not os.path.exists(tmp)


def test_server_engine_answers_in_flight_requests_with_an_error(tiny_model_dir):
    from tessellm.entrypoints.async_llm import AsyncLLM

    async def main():
        before = _descendants(os.getpid())
        engine = AsyncLLM(EngineArgs(model=tiny_model_dir("llama"), device="cpu", num_kv_blocks=64,
                                     tensor_parallel_size=2))
        try:
            params = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0.0)
            stream = engine.generate({"prompt_token_ids": [1, 2, 3]}, params, request_id="r1")
            first = await stream.__anext__()  # the request is running
            assert first.outputs[0].token_ids
            # The core's two worker processes; kill one of them.
            workers = _worker_processes(engine.cores.pids()[0], before)
            assert len(workers) == 2, workers
            os.kill(workers[-1], signal.SIGKILL)
            with pytest.raises(Exception, match="(?i)rank|worker|engine"):
                async for _ in stream:
                    pass
        finally:
            await engine.shutdown()

    asyncio.run(asyncio.wait_for(main(), timeout=120))


def _worker_processes(core_pid: int, before: set[int]) -> list[int]:
    """The processes started since ``before`` (the descendants of this process then) that run
    no children of their own (a forkserver does), other than the engine core and
    multiprocessing's resource tracker: the core's workers, forked by the forkserver that
    forked the core (distributed/spawn.py) or by one of the core's own."""
    return [pid for pid in _descendants(os.getpid()) - before - {core_pid}
            if not _children(pid) and not _is_resource_tracker(pid)]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def _descendants(pid: int) -> set[int]:
    found, todo = set(), _children(pid)
    while todo:
        child = todo.pop()
        found.add(child)
        todo += _children(child)
    return found


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except FileNotFoundError:
        return False
