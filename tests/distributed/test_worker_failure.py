"""A worker process that dies makes the engine fail fast with a clear error, never hang; in
serving, the in-flight requests are answered with that error. A worker that raises releases
what it holds before it exits (its KV connector's saves under way written)."""

from __future__ import annotations

import asyncio
import gc
import os
import re
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


# -- a rank that raises (TESSELLM_TEST_WORKER_FAILS_AT, envs.py) -----------------------------------

_HOOK_ERROR = r"Worker rank 1 failed: RuntimeError: rank 1 fails in its step 1 \(TESSELLM_TEST_WORKER_FAILS_AT"


def _producer_args(model: str, path) -> dict:
    """TP=2, a shared-storage KV producer: eight 480-token prompts save 960 blocks a rank in
    their one step."""
    return dict(model=model, device="cpu", dtype="float32", block_size=4, num_kv_blocks=1024,
                max_model_len=512, max_num_batched_tokens=4096, max_num_seqs=8, tensor_parallel_size=2,
                kv_transfer_config={"kv_connector": "SharedStorageConnector", "kv_role": "kv_producer",
                                    "kv_connector_extra_config": {"shared_storage_path": str(path)}})


def test_a_failing_rank_releases_and_the_engine_names_it(tiny_model_dir, tmp_path, monkeypatch):
    """Rank 1 raises in the step that saves the prompts' blocks, its saves under way: it
    writes them before it exits (before, it exited with them half written), rank 0 is told to
    shut down and writes its own, and ``generate`` raises one error naming rank 1 and its
    exception."""
    from tests.core.test_core_process_shutdown import _assert_all_saved

    monkeypatch.setenv("TESSELLM_TEST_WORKER_FAILS_AT", "1:1")
    llm = LLM(**_producer_args(tiny_model_dir("llama"), tmp_path))
    procs = llm.engine.core.executor._procs
    try:
        with pytest.raises(WorkerDiedError, match=_HOOK_ERROR):
            llm.generate([{"prompt_token_ids": p} for p in _prompts()],
                         SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
        # Both ranks exited by themselves: rank 1 of its error, rank 0 told to shut down.
        assert [p.exitcode for p in procs] == [0, 1]
    finally:
        llm.shutdown()
    _assert_all_saved(tmp_path, ranks=2)


def test_a_failing_rank_fails_every_served_request_with_its_error(tiny_model_dir, tmp_path, monkeypatch):
    """Served (the core in its own process): every request in flight gets the one error naming
    the rank and its exception, none hangs, and the core process exits, its ranks' saves
    written."""
    from tessellm.entrypoints.async_llm import AsyncLLM
    from tessellm.kv_transfer.shared_storage_format import loadable

    monkeypatch.setenv("TESSELLM_TEST_WORKER_FAILS_AT", "1:1")

    async def one(engine, i: int, prompt: list[int]) -> str:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        try:
            async for _ in engine.generate({"prompt_token_ids": prompt}, params, request_id=f"r{i}"):
                pass
        except Exception as exc:  # noqa: BLE001 - what each request got is the assertion
            return str(exc)
        return "finished"

    async def main():
        # No warm-up: its steps would count first (a failure in warm-up fails every request too).
        engine = AsyncLLM(EngineArgs(**_producer_args(tiny_model_dir("llama"), tmp_path), kernel_warmup=False))
        try:
            errors = await asyncio.gather(*[one(engine, i, p) for i, p in enumerate(_prompts())])
            core = engine.cores.clients[0].proc
        finally:
            await engine.shutdown()
        return errors, core

    errors, core = asyncio.run(asyncio.wait_for(main(), timeout=180))
    assert len(set(errors)) == 1 and re.search(_HOOK_ERROR, errors[0]), errors
    assert core.exitcode == 1
    # The failed step's blocks (the requests that had arrived by then: one or more), each saved
    # whole by both ranks: the failed rank's saves under way too.
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert not [f for f in files if ".tmp" in os.path.basename(f)], files
    keys = [{os.path.basename(f).split(".")[0] for f in files if f.endswith(f".r{r}.kv")} for r in (0, 1)]
    assert keys[0] and keys[0] == keys[1] and len(files) == 2 * len(keys[0])
    assert all(loadable(f, None) for f in files)


def _prompts() -> list[list[int]]:
    from tests.core.test_core_process_shutdown import _prompts as eight_480_token_prompts

    return eight_480_token_prompts()
