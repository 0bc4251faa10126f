"""The tpu lane (ci/matrix.yaml ``tpu-xla-cpu``): torch-xla really imported, the tpu backend's
model step as XLA programs on PJRT's CPU device (``PJRT_DEVICE=CPU``), greedy tokens equal to the
cpu backend's, and a bounded number of compiled programs. Skipped where torch-xla is absent."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")
torch_xla = pytest.importorskip("torch_xla")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
           "List three colors:"]


def _compiles() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return data[0] if data else 0


def _greedy(llm, prompts, n):
    from tessellm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_smollm2_greedy_parity_on_xla():
    from tessellm import LLM

    engine = dict(dtype="float32", max_model_len=256, num_kv_blocks=64, max_num_seqs=4)
    with LLM(device="cpu", **engine) as cpu:
        expected = _greedy(cpu, PROMPTS, 32)
    with LLM(device="tpu", **engine) as tpu:
        assert tpu.engine.core.runner.device.type == "xla"
        assert tpu.engine.core.runner.kernel.name == "xla-padded"
        got = _greedy(tpu, PROMPTS, 32)
    assert got == expected


def test_mixed_run_compiles_a_bounded_set_of_programs(tiny_llama):
    """64 requests of mixed prompt and output lengths: the XLA programs compiled are counted
    (printed for the report) and bounded by the buckets; a second identical run compiles at most
    a handful more (see docs/plugins.md for the measured figures)."""
    from tessellm import LLM, SamplingParams

    engine = dict(dtype="float32", block_size=16, num_kv_blocks=256, max_model_len=128,
                  max_num_seqs=16, max_num_batched_tokens=128, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": [1 + i % 7] + list(range(10, 10 + (i * 5) % 60))}
               for i in range(64)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i % 13, ignore_eos=True)
              for i in range(64)]
    with LLM(tiny_llama, device="cpu", **engine) as cpu:
        expected = [o.outputs[0].token_ids for o in cpu.generate(prompts, params, use_tqdm=False)]
    with LLM(tiny_llama, device="tpu", **engine) as tpu:
        c0 = _compiles()
        first = [o.outputs[0].token_ids for o in tpu.generate(prompts, params, use_tqdm=False)]
        c1 = _compiles()
        second = [o.outputs[0].token_ids for o in tpu.generate(prompts, params, use_tqdm=False)]
        c2 = _compiles()
    print(f"\nXLA programs compiled: first 64-request run {c1 - c0}, second identical run {c2 - c1}")
    assert first == expected and second == expected
    # tokens: pow2 buckets 8..128 (5), sequences 1..16 (5), query lengths, block counts: bounded
    assert 0 < c1 - c0 <= 60
    assert c2 - c1 <= 2
