"""Tensor and pipeline parallelism on the CPU with gloo: greedy tokens identical to one process.

Real worker processes (``mp`` executor) on a tiny random Llama; T x P ranks each run their
shard of the model and exchange activations through torch.distributed (gloo).
"""

from __future__ import annotations

import pytest

from tessellm import LLM

from parity_helpers import greedy_tokens, one_process_tokens

PROMPTS = [[5, 17, 42, 99, 3, 250], [7, 7, 7], list(range(40, 80)), [300, 12]]


def _tokens(llm) -> list[list[int]]:  # also used by test_cuda_parallel.py, test_ray_executor.py
    return greedy_tokens(llm, PROMPTS)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    path = tiny_model_dir("llama-sharp")
    return path, one_process_tokens(path, PROMPTS)


@pytest.mark.parametrize("tp,pp,async_scheduling", [(2, 1, False), (1, 2, False), (2, 2, False),
                                                    (2, 1, True)])
def test_mp_matches_one_process(reference, tp, pp, async_scheduling):
    path, expected = reference
    # Small steps (max_num_batched_tokens) so prompts are chunked and several batches are in
    # flight through the pipeline (or, async, the workers hold a step's tokens until the next
    # step is launched, or a flush).
    llm = LLM(path, device="cpu", num_kv_blocks=64, seed=0, tensor_parallel_size=tp,
              pipeline_parallel_size=pp, max_num_batched_tokens=24,
              async_scheduling=async_scheduling)
    core = llm.engine.core
    in_flight = []  # how many steps were already in flight at each submit (not this one)
    submit = core.executor.submit
    core.executor.submit = lambda sched: (in_flight.append(len(core.in_flight) - 1), submit(sched))
    try:
        assert len(core.executor.worker_info) == tp * pp
        assert _tokens(llm) == expected
    finally:
        llm.shutdown()
    # With two stages (or async) a second batch was submitted while the first was in flight.
    assert max(in_flight) == (1 if async_scheduling else pp - 1)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_tp_matches_one_process_across_architectures(tiny_model_dir, arch):
    """TP=2 on the other architectures: q/k/v biases (qwen2), q/k norms and tied embeddings
    (qwen3), a sliding window (mistral). Row-parallel outputs are summed by the next RMSNorm
    (``RMSNorm(reduce=tp)``), so each layer's norms see whole sums."""
    path = tiny_model_dir(arch)
    with LLM(path, device="cpu", num_kv_blocks=64, seed=0) as llm:
        expected = _tokens(llm)
    with LLM(path, device="cpu", num_kv_blocks=64, seed=0, tensor_parallel_size=2) as llm:
        assert _tokens(llm) == expected
