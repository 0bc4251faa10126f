"""The tpu lane (ci/matrix.yaml ``tpu-xla-cpu``): torch-xla really imported, the tpu backend's
model step as XLA programs on PJRT's CPU device (``PJRT_DEVICE=CPU``), greedy tokens equal to the
cpu backend's, every bucketed step shape compiled at start-up and none after. Skipped where
torch-xla is absent (the default suite: torch 2.13)."""

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


def _tokens(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _kernel(runner):
    return getattr(runner.kernel, "_inner", runner.kernel)  # backends/checked.py wraps it


def test_smollm2_greedy_parity_on_xla():
    """SmolLM2 (30 layers) eagerly: only the shapes the 4 prompts meet are compiled."""
    from tessellm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    engine = dict(dtype="float32", max_model_len=256, num_kv_blocks=64, max_num_seqs=4,
                  max_num_batched_tokens=64)
    with LLM(device="cpu", **engine) as cpu:
        expected = _tokens(cpu, PROMPTS, params)
    with LLM(device="tpu", enforce_eager=True, **engine) as tpu:
        runner = tpu.engine.core.runner
        assert runner.device.type == "xla" and not tpu.engine.core.backend.emulated
        assert _kernel(runner).name == "xla-padded"  # PJRT CPU: the pure-XLA path
        c0 = _compiles()
        got = _tokens(tpu, PROMPTS, params)
        layer = next(iter(runner.model.attention_layers()))
        assert layer.k_cache.device.type == "xla"
        compiled = _compiles() - c0
    print(f"\ntorch_xla {torch_xla.__version__}: SmolLM2 4x32 eager, {compiled} XLA programs")
    assert got == expected
    assert 0 < compiled <= 6  # a prefill bucket or two, a decode bucket


def test_mixed_run_compiles_every_program_at_start_and_none_after(tiny_llama):
    """64 requests of mixed prompt (1-60 tokens) and output (4-16 tokens) lengths: start-up
    compiles one program per bucketed step shape; the run, and a second identical one, none."""
    from tessellm import LLM, SamplingParams
    from tessellm.metrics.compile_counter import COUNTER

    engine = dict(dtype="float32", block_size=16, num_kv_blocks=64, max_model_len=128,
                  max_num_seqs=4, max_num_batched_tokens=32, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": [1 + i % 7] + list(range(10, 10 + (i * 5) % 60))}
               for i in range(64)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i % 13, ignore_eos=True)
              for i in range(64)]
    with LLM(tiny_llama, device="cpu", **engine) as cpu:
        expected = _tokens(cpu, prompts, params)
    with LLM(tiny_llama, device="tpu", **engine) as tpu:
        pre = tpu.engine.core.runner.precompiled
        c0 = _compiles()
        first = _tokens(tpu, prompts, params)
        c1 = _compiles()
        second = _tokens(tpu, prompts, params)
        c2 = _compiles()
        after_ready = COUNTER.xla_after_ready  # what /metrics-style accounting sees
    print(f"\nXLA programs: {pre['compiled']} precompiled for {pre['shapes']} step shapes in "
          f"{pre['seconds']:.0f}s; first 64-request run {c1 - c0}, second {c2 - c1}")
    assert first == expected and second == expected
    # decode: 1, 2, 4 sequences; mixed: 8, 16, 32 tokens x 1, 2, 4 sequences
    assert pre["shapes"] == 12 and pre["compiled"] == 12
    assert c1 - c0 == 0 and c2 - c1 == 0 and after_ready == 0  # ready means warm


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_checkpoint_greedy_on_xla(tiny_llama, tmp_path, fmt):
    """An AWQ / GPTQ checkpoint of the tiny Llama (groups of 32, written by the test-side packer)
    served on XLA, each int4 layer dequantized inside the traced step (``tpu/quant_ops.py``),
    gives the greedy tokens of its dequantized float32 checkpoint on the cpu backend; the
    layers stayed int4 and the run compiled nothing after start-up."""
    from tessellm import LLM, SamplingParams
    from tessellm.quantization.loading import quantized_linears
    from tests.quantization.int4_checkpoint import write_int4

    dirs = write_int4(tiny_llama, tmp_path, fmts=(fmt,))
    prompts = [{"prompt_token_ids": p} for p in ([1, 17, 42, 99, 3], [5, 200, 7], [9] * 12)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine = dict(dtype="float32", block_size=16, num_kv_blocks=32, max_model_len=64,
                  max_num_seqs=4, max_num_batched_tokens=32)
    with LLM(dirs["deq"], device="cpu", **engine) as cpu:
        expected = _tokens(cpu, prompts, params)
    with LLM(dirs[fmt], device="tpu", **engine) as tpu:
        layers = quantized_linears(tpu.engine.core.runner.model)
        c0 = _compiles()
        got = _tokens(tpu, prompts, params)
        compiled = _compiles() - c0
    assert {type(s).__name__ for l in layers.values() for s in l.segments} == {"Int4Weight"}
    assert len(layers) == 4 * 2  # qkv, o, gate_up, down per layer
    assert got == expected
    assert compiled == 0


def test_reference_ops_unpack_words_with_the_sign_bit_on_xla():
    """The reference ops' int32 unpacking (int4 codes, int4 MoE experts, structured output's
    token bitmask) on XLA tensors reads the same bits as on the host, words with bit 31 set
    included (torch-xla lowers ``>>`` of a negative int32 as a rounded division; they use
    ``torch.bitwise_right_shift``)."""
    import torch

    from tessellm.backends.reference.logits import unpack_bitmask
    from tessellm.quantization.int4 import unpack_awq
    from tessellm.quantization.packed import unpack_int4

    dev = torch_xla.device()
    words = torch.tensor([[-3, -634788036, 5, -2**31]], dtype=torch.int32)
    assert torch.equal(unpack_bitmask(words.to(dev), 128).cpu(), unpack_bitmask(words, 128))
    assert torch.equal(unpack_int4(words.t().to(dev)).cpu(), unpack_int4(words.t()))
    assert torch.equal(unpack_awq(words.to(dev)).cpu(), unpack_awq(words))
    from tessellm.backends.reference.moe import dequantize_int4

    scale = torch.ones(1, 1)
    assert torch.equal(dequantize_int4(words.to(dev), scale.to(dev), None, torch.float32).cpu(),
                       dequantize_int4(words, scale, None, torch.float32))
