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


def _fallback_counts() -> dict:
    """torch-xla's counters of ops it ran on the host (``aten::*``: no XLA lowering)."""
    import torch_xla.debug.metrics as met

    return {n: met.counter_value(n) for n in met.counter_names() if n.startswith("aten::")}


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


def _moe_case(kind: str, e: int, h: int, i: int):
    """``(w13, w2, kwargs)`` of ``e`` random experts stored as ``kind``: float32, fp8 with
    per-channel scales, AWQ-style int4 (groups of 32 inputs, zero codes), or that with GPTQ act
    order's per-expert input order (``w13_perm``)."""
    import torch

    from tessellm.quantization.packed import pack_int4, quantize_int4

    g = torch.Generator().manual_seed(7)
    w13, w2 = torch.randn(e, 2 * i, h, generator=g) / h ** 0.5, torch.randn(e, h, i, generator=g) / i ** 0.5
    if kind == "float":
        return w13, w2, {}
    if kind == "fp8":
        s13, s2 = (w.abs().amax(-1) / 448 for w in (w13, w2))
        return ((w13 / s13[..., None]).to(torch.float8_e4m3fn),
                (w2 / s2[..., None]).to(torch.float8_e4m3fn), dict(w13_scale=s13, w2_scale=s2))
    packed = []
    for w in (w13, w2):
        parts = [quantize_int4(we, 32) for we in w]
        packed.append((torch.stack([pack_int4(q).t() for q, _, _ in parts]).contiguous(),
                       torch.stack([s.t() for _, s, _ in parts]).half().contiguous(),
                       torch.stack([z.t().to(torch.uint8) for _, _, z in parts]).contiguous()))
    (q13, s13, z13), (q2, s2, z2) = packed
    kw = dict(w13_scale=s13, w2_scale=s2, int4=True, w13_zeros=z13, w2_zeros=z2)
    if kind == "int4-act-order":
        kw["w13_perm"] = torch.stack([torch.randperm(h, generator=g) for _ in range(e)]).int()
    return q13, q2, kw


@pytest.mark.parametrize("kind", ["float", "fp8", "int4", "int4-act-order"])
def test_moe_experts_compile_once_whatever_the_routing(kind):
    """The tpu ops' MoE (``tpu/xla_moe.py``) on XLA tensors: for a decode-sized step (4 tokens x
    top 2 of 16 experts: the gathered form) and a prefill-sized one (16 tokens: the dense form),
    three different routings give the reference loop's output, compile one program per step
    size (the first routing's) and none for the others, with no value read back to the host
    while the step is traced."""
    import torch
    import torch_xla.debug.metrics as met

    from tessellm.backends.reference.moe import fused_moe_reference
    from tessellm.backends.registry import get_registry
    from tessellm.backends.spec import OpsSpec

    registry = get_registry()
    ops = registry.fused_ops(registry.backends["tpu"], OpsSpec(torch.float32))
    dev = torch_xla.device()
    w13, w2, kw = _moe_case(kind, e=16, h=64, i=32)
    args = [w13.to(dev), w2.to(dev)]
    kw_dev = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    fallbacks = _fallback_counts()
    for tokens in (4, 16):
        compiled = []
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            x, logits = torch.randn(tokens, 64, generator=g), torch.randn(tokens, 16, generator=g) * 4
            want = fused_moe_reference(x, logits, w13, w2, 2, **kw)
            c0, reads = _compiles(), met.counter_value("aten::_local_scalar_dense") or 0
            transfers = (met.metric_data("TransferFromDeviceTime") or (0,))[0]
            out = ops.fused_moe(x.to(dev), logits.to(dev), *args, 2, **kw_dev)
            assert (met.counter_value("aten::_local_scalar_dense") or 0) == reads
            assert (met.metric_data("TransferFromDeviceTime") or (0,))[0] == transfers
            torch_xla.sync()
            compiled.append(_compiles() - c0)
            torch.testing.assert_close(out.cpu(), want, rtol=1e-4, atol=1e-5)
        assert compiled[0] >= 1 and compiled[1:] == [0, 0], (tokens, compiled)
    assert _fallback_counts() == fallbacks  # no op ran on the host through torch-xla's fallback


def test_int4_moe_checkpoint_greedy_on_xla(tmp_path):
    """A tiny Qwen3-MoE AWQ checkpoint (32 experts, top 2; groups of 32) served on XLA with its
    experts int4 (``tpu/xla_moe.py``: decode steps of 8 padded tokens gather their 16 experts,
    larger steps run all 32 masked) gives the greedy tokens of its dequantized float32
    checkpoint on the cpu backend, and the run, whose routing changes at every step, compiles
    nothing after start-up."""
    import torch
    from transformers import AutoModelForCausalLM

    from tessellm import LLM, SamplingParams
    from tests.quantization.int4_checkpoint import write_int4
    from tests.quantization.test_moe_int4 import _configs

    torch.manual_seed(3)
    config = _configs()["qwen3-moe"]
    config.num_experts = 32
    dense = str(tmp_path / "dense")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(dense)
    dirs = write_int4(dense, tmp_path, fmts=("awq",))
    prompts = [{"prompt_token_ids": p} for p in ([1, 17, 42, 99, 3], [5, 100, 7],
                                                  list(range(20, 50)))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine = dict(dtype="float32", block_size=16, num_kv_blocks=16, max_model_len=64,
                  max_num_seqs=2, max_num_batched_tokens=16)
    with LLM(dirs["deq"], device="cpu", **engine) as cpu:
        expected = _tokens(cpu, prompts, params)
    with LLM(dirs["awq"], device="tpu", **engine) as tpu:
        from tessellm.layers.moe import FusedMoE

        moes = [m for m in tpu.engine.core.runner.model.modules() if isinstance(m, FusedMoE)]
        pre = tpu.engine.core.runner.precompiled
        c0 = _compiles()
        got = _tokens(tpu, prompts, params)
        compiled = _compiles() - c0
    print(f"\nint4 MoE: {pre['compiled']} XLA programs precompiled in {pre['seconds']:.0f}s, "
          f"{compiled} during the run")
    assert moes and all(m.w13.dtype == torch.int32 for m in moes)
    assert got == expected
    assert compiled == 0


def test_derived_weights_keep_one_program_on_xla():
    """A derived weight (``layers/derived.py``: ``-exp(A_log)`` of a Mamba / gated DeltaNet
    layer) on XLA is made afresh inside each step's program: four steps compile one program, not
    one with the derivation and one reading a kept copy, and an in-place weight update shows in
    the next step with no new program."""
    import torch

    from tessellm.layers.derived import DerivedWeight, neg_exp_float

    dev = torch_xla.device()
    w0 = torch.randn(8)
    weight = torch.nn.Parameter(w0.to(dev), requires_grad=False)
    x = torch.randn(8).to(dev)
    derived = DerivedWeight(neg_exp_float)
    torch_xla.sync()
    compiled, outs = [], []
    for step in range(5):
        if step == 4:
            weight.data.copy_(torch.zeros(8))  # a weight update: A = -1 everywhere
        c0 = _compiles()
        out = x * derived(weight)
        torch_xla.sync()
        compiled.append(_compiles() - c0)
        outs.append(out.cpu())
    assert compiled[0] == 1 and compiled[1:] == [0, 0, 0, 0], compiled
    for out in outs[:4]:
        torch.testing.assert_close(out, x.cpu() * -torch.exp(w0))
    torch.testing.assert_close(outs[4], -x.cpu())
