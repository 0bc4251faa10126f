"""The ``ray`` executor on a local Ray cluster (CPU actors, gloo): greedy tokens identical to one
process, and a dead actor fails the engine fast."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")

from tessellm import LLM  # noqa: E402
from tessellm.distributed.executor import WorkerDiedError  # noqa: E402

from test_parallel_parity import PROMPTS, _tokens  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    # 4 logical CPUs, so a TP=2 x PP=2 placement group fits on a 2-core CI machine.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    path = tiny_model_dir("llama-sharp")
    with LLM(path, device="cpu", num_kv_blocks=64, seed=0) as llm:
        return path, _tokens(llm)


# (1, 2): pipeline stages alone; (2, 2) runs them too, each of two ranks (time: slow).
@pytest.mark.parametrize("tp,pp,async_scheduling", [(2, 1, False), pytest.param(1, 2, False, marks=pytest.mark.slow),
                                                    (2, 2, False), (2, 1, True)])
def test_ray_matches_one_process(ray_cluster, reference, tp, pp, async_scheduling):
    """Async: each actor returns a step's tokens only with the next step's launch (or a flush)."""
    path, expected = reference
    with LLM(path, device="cpu", num_kv_blocks=64, seed=0, tensor_parallel_size=tp,
             pipeline_parallel_size=pp, distributed_executor_backend="ray",
             max_num_batched_tokens=24, async_scheduling=async_scheduling) as llm:
        core = llm.engine.core
        assert len(core.executor.worker_info) == tp * pp
        in_flight = []  # steps already in flight at each submit (not counting the one submitted)
        submit = core.executor.submit
        core.executor.submit = lambda sched: (in_flight.append(len(core.in_flight) - 1), submit(sched))
        assert _tokens(llm) == expected
        if (tp, pp, async_scheduling) == (2, 1, False):  # vLLM's collective_rpc timeout
            with pytest.raises(TimeoutError, match="'kv_block_bytes' timed out: ranks 0, 1 did not answer"):
                llm.collective_rpc("kv_block_bytes", timeout=0)
            assert len(llm.collective_rpc("kv_block_bytes", timeout=60)) == 2
    assert max(in_flight) == (1 if async_scheduling or pp > 1 else 0)
    # The placement group is released (asynchronously): the next engine gets the same CPUs.
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 4


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_dead_actor_fails_fast(ray_cluster, reference, async_scheduling):
    path, _ = reference
    llm = LLM(path, device="cpu", num_kv_blocks=64, seed=0, tensor_parallel_size=2,
              distributed_executor_backend="ray", async_scheduling=async_scheduling)
    ray.kill(llm.engine.core.executor._actors[1])
    with pytest.raises(WorkerDiedError, match="rank 1"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], use_tqdm=False)
    llm.shutdown()


def test_shutdown_writes_the_ranks_kv_saves_under_way(ray_cluster, tiny_model_dir, tmp_path):
    """Shut down right after the step whose blocks are being saved: each Ray rank releases its
    worker (its KV connector writes its saves under way) before its actor is killed."""
    from tessellm import SamplingParams
    from tests.core.test_core_process_shutdown import BS, _assert_all_saved, _producer, _prompts

    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", block_size=BS, num_kv_blocks=1024,
              max_model_len=512, max_num_batched_tokens=4096, max_num_seqs=8, tensor_parallel_size=2,
              distributed_executor_backend="ray", kv_transfer_config=_producer(tmp_path))
    engine = llm.engine
    for i, prompt in enumerate(_prompts()):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    while not any(out.finished for out in engine.step()):
        pass
    llm.shutdown()
    _assert_all_saved(tmp_path, ranks=2)
