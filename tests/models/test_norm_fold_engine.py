"""The residual-add RMSNorms split between the one-row GEMVs around them
(``TESSELLM_NORM_FOLD2=1``: ``layers.linear.fold_norm_out`` / ``fold_norm_in``,
``models.decoder.link_norm_folds``): taken only at one row and only when asked, each layer's
o_proj and down_proj (but the last) produce, each gate_up and qkv_proj (but the first) consume,
and the greedy tokens follow the unfused path's.

The cpu backend serves the pair itself (``CpuOps``: torch around its ``linear``; off unless
asked), checked against HF's greedy tokens. The other engine tests put the cuda backend's ops
on the cpu backend: in float32 through their torch forms (the decoder wiring; the norm's weight multiplies the activation before the product
instead of after the norm, a few float32 ulps), and in bf16 through the cuda backend's Triton
GEMVs in Triton's interpreter (the split norm's rounding differs from the unfused norm's by about
one bf16 rounding of the activation, so logprobs agree closely, not bitwise).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm import LLM, SamplingParams  # noqa: E402
from tessellm.backends.cpu.ops import CpuOps  # noqa: E402
from tessellm.kernels.fused_ops import TritonOps  # noqa: E402
from tessellm.layers.linear import (ColumnParallelLinear, NormFold, RowParallelLinear,  # noqa: E402
                                    fold_norm_in, fold_norm_out)
from tessellm.layers.norm import RMSNorm  # noqa: E402
from tests.conftest import _tiny_configs  # noqa: E402
from tests.gpu_set import gpu_when_present  # noqa: E402

PROMPTS = [[(5 * j + 3) % 384 for j in range(11)], [(7 * j + 1) % 384 for j in range(6)]]
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="Triton's interpreter on the cpu backend; the GPU has its own test")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    config = _tiny_configs()["llama"]
    torch.manual_seed(1234)
    path = str(tmp_path_factory.mktemp("normfold-llama"))
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def _run(path, monkeypatch, dtype, max_tokens=4):
    triton_ops = TritonOps()
    calls = []

    def produce(self, x, w, residual, norm_weight, b=None):
        calls.append(("out", x.shape[0], w.data_ptr()))
        return triton_ops.linear_add_rms_norm_fold(x, w, residual, norm_weight, b)

    def consume(self, x, w, sumsq, eps, b=None, silu_and_mul=False):
        calls.append(("in", x.shape[0], w.data_ptr()))
        return triton_ops.linear_rms_scaled(x, w, sumsq, eps, b, silu_and_mul)

    monkeypatch.setattr(CpuOps, "linear_add_rms_norm_fold", produce, raising=False)
    monkeypatch.setattr(CpuOps, "linear_rms_scaled", consume, raising=False)
    llm = LLM(path, dtype=dtype, device="cpu", enable_prefix_caching=False)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=3)
    one = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)  # M = 1
    two = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    llm.shutdown()
    outs = [(o.outputs[0].token_ids, _logprobs(o)) for o in one + two]
    return outs, calls


def _logprobs(out):
    return [sorted((t, lp.logprob) for t, lp in step.items()) for step in out.outputs[0].logprobs]


def _close(got, want, tol):
    for (tokens, lps), (want_tokens, want_lps) in zip(got, want):
        assert tokens == want_tokens
        for step, want_step in zip(lps, want_lps):
            assert [t for t, _ in step] == [t for t, _ in want_step]
            for (_, lp), (_, want_lp) in zip(step, want_step):
                assert abs(lp - want_lp) < tol, (lp, want_lp)


@CPU_ONLY
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4),
                                       # the Triton GEMVs in the interpreter (slow); the kernels'
                                       # own tests (test_gemv_fold.py) run by default
                                       pytest.param("bfloat16", 0.05, marks=pytest.mark.slow)])
def test_greedy_tokens_follow_the_unfused_path(tiny_llama, monkeypatch, dtype, tol):
    monkeypatch.delenv("TESSELLM_NORM_FOLD2", raising=False)
    want, none = _run(tiny_llama, monkeypatch, dtype)
    assert none == [], "off by default on the cpu backend (no norm_fold_default)"
    monkeypatch.setenv("TESSELLM_NORM_FOLD2", "1")
    got, calls = _run(tiny_llama, monkeypatch, dtype)
    assert calls and {r for _, r, _ in calls} == {1}, "asked only at one row"
    layers = _tiny_configs()["llama"].num_hidden_layers
    out_w = [w for k, _, w in calls if k == "out"]
    in_w = [w for k, _, w in calls if k == "in"]
    # per one-row step: every o_proj and every down_proj but the last produce; every gate_up
    # and every qkv but the first consume
    assert len(set(out_w)) == 2 * layers - 1 and len(set(in_w)) == 2 * layers - 1
    assert len(out_w) == len(in_w) and len({out_w.count(w) for w in out_w}) == 1
    _close(got, want, tol)


def test_cpu_backend_serves_the_pair(tiny_llama, monkeypatch):
    """The cpu backend's own pair (``CpuOps.linear_add_rms_norm_fold`` / ``linear_rms_scaled``,
    torch around its ``linear``): not taken by default; under ``TESSELLM_NORM_FOLD2=1`` taken at
    one row, and the float32 greedy tokens are HF transformers' and the unfused run's."""
    from tests.conftest import hf_greedy

    calls = []
    for name in ("linear_add_rms_norm_fold", "linear_rms_scaled"):
        def counted(self, *a, _f=getattr(CpuOps, name), _n=name, **kw):
            calls.append(_n)
            return _f(self, *a, **kw)
        monkeypatch.setattr(CpuOps, name, counted)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)

    def generate():
        with LLM(tiny_llama, dtype="float32", device="cpu", enable_prefix_caching=False) as llm:
            out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)[0]
        return [(out.outputs[0].token_ids, _logprobs(out))]

    monkeypatch.delenv("TESSELLM_NORM_FOLD2", raising=False)
    want = generate()
    assert calls == []
    monkeypatch.setenv("TESSELLM_NORM_FOLD2", "1")
    got = generate()
    assert {"linear_add_rms_norm_fold", "linear_rms_scaled"} <= set(calls)
    assert list(got[0][0]) == hf_greedy(tiny_llama, [PROMPTS[0]], 6)[0]
    _close(got, want, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuda backend's kernels on a GPU")
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_cuda_greedy_tokens_with_the_fold(tiny_llama, monkeypatch, quantization):
    """On the cuda backend (bf16, CUDA graphs, PDL), TESSELLM_NORM_FOLD2 off and on: the fold's
    GEMVs run (counted) and greedy tokens are the same, logprobs within a bf16 rounding."""
    from tessellm.kernels import fused_ops
    from tessellm.kernels.gemm import quant_ops

    calls = []
    names = {fused_ops: ("gemv_add_rms_norm_fold", "gemv_rms_scaled"),
             quant_ops: ("gemv_fp8_x2_add_rms_norm_fold", "gemv_fp8_x2_rms_scaled")}
    for mod, fns in names.items():
        for name in fns:
            def counted(*a, _f=getattr(mod, name), _n=name, **kw):
                calls.append(_n)
                return _f(*a, **kw)
            monkeypatch.setattr(mod, name, counted)
    kw = dict(dtype="bfloat16", enable_prefix_caching=False, quantization=quantization,
              max_num_seqs=4)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)

    def generate():
        llm = LLM(tiny_llama, **kw)
        outs = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)
        llm.shutdown()
        return [(o.outputs[0].token_ids, _logprobs(o)) for o in outs]

    monkeypatch.setenv("TESSELLM_NORM_FOLD2", "0")
    want = generate()
    assert not calls
    monkeypatch.setenv("TESSELLM_NORM_FOLD2", "1")
    got = generate()
    assert {n for n in calls if "rms_scaled" in n} and {n for n in calls if "fold" in n}, \
        "the fold's GEMVs never ran"
    _close(got, want, 0.05)


def _layers(dev, dtype=torch.bfloat16):
    from tessellm.distributed.parallel_state import TensorParallel

    tp = TensorParallel(0, 1)
    torch.manual_seed(3)
    o = RowParallelLinear(32, 16, tp=tp).to(dev)
    gate_up = ColumnParallelLinear(16, [24, 24], tp=tp).to(dev)
    for m in (o, gate_up):
        torch.nn.init.normal_(m.weight, std=0.2)
        m.weight.data = m.weight.data.to(dtype)
    ops = TritonOps()
    norm = RMSNorm(16, 1e-5, ops).to(dev)
    norm.weight.data = (1 + 0.3 * torch.randn(16)).to(dev, dtype)
    return o, gate_up, norm, ops


@gpu_when_present
def test_fold_only_for_a_plain_one_row_pair():
    """A backend without the ops, two rows, a LoRA wrapper as producer or consumer and a norm
    with a reduce group keep the unfused launches (None); a plain pair at one row folds, and
    its result is the unfused path's within a bf16 rounding."""
    from tessellm.backends.reference.ops import ReferenceOps
    from tessellm.lora.layers import LoRABatch, LoRALinear

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    o, gate_up, norm, ops = _layers(dev)
    x = torch.randn(1, 32).bfloat16().to(dev)
    res = torch.randn(1, 16).bfloat16().to(dev)
    ref_norm = RMSNorm(16, 1e-5, ReferenceOps()).to(dev)
    assert fold_norm_out(o, x, res.clone(), ref_norm, gate_up) is None  # no such ops
    assert fold_norm_out(o, torch.cat([x, x]), torch.cat([res, res]), norm, gate_up) is None
    assert fold_norm_out(o, x, None, norm, gate_up) is None  # the first layer's stream
    wrapped = LoRALinear(o, LoRABatch(None, 2), num_slots=2, rank=4).to(dev)
    assert fold_norm_out(wrapped, x, res.clone(), norm, gate_up) is None
    wrapped_c = LoRALinear(gate_up, LoRABatch(None, 2), num_slots=2, rank=4).to(dev)
    assert fold_norm_out(o, x, res.clone(), norm, wrapped_c) is None
    r = res.clone()
    folded = fold_norm_out(o, x, r, norm, gate_up)
    assert folded is not None
    fold, new_res = folded
    assert isinstance(fold, NormFold) and new_res.data_ptr() == r.data_ptr()
    got = fold_norm_in(gate_up, fold, silu_and_mul=True)
    normed, want_res = ops.fused_add_rms_norm(ops.linear(x, o.weight), res.clone(), norm.weight,
                                              1e-5)
    assert torch.equal(new_res, want_res)
    want = ops.linear_silu_and_mul(normed, gate_up.weight)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    # a consumer the backend cannot serve finishes the norm in torch: the same within rounding
    plain = fold_norm_in(wrapped_c, fold)
    torch.testing.assert_close(plain.float(), ops.linear(normed, gate_up.weight).float(),
                               atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("env,ops,dtype,quant,want", [
    (None, "cuda", torch.bfloat16, None, True),     # the cuda backend's default: dense 16-bit
    (None, "cuda", torch.float16, None, True),
    (None, "cuda", torch.float32, None, False),     # float32 keeps the two norm launches
    (None, "cuda", torch.bfloat16, "fp8", False),   # quantized weights: opt-in (fp8 B1 +5%)
    (None, "triton", torch.bfloat16, None, False),  # TritonOps alone (rocm): never timed
    (None, "cpu", torch.bfloat16, None, False),     # the cpu pair: declared, slower (+26%)
    ("1", "cpu", torch.float32, None, True),
    ("0", "cuda", torch.bfloat16, None, False),
    ("1", "triton", torch.float32, "fp8", True),
])
def test_norm_fold2_default_is_the_backends_for_dense_16_bit(monkeypatch, env, ops, dtype, quant,
                                                               want):
    from types import SimpleNamespace

    from tessellm.backends.cuda.ops import CudaOps
    from tessellm.models.decoder import norm_fold2_on

    if env is None:
        monkeypatch.delenv("TESSELLM_NORM_FOLD2", raising=False)
    else:
        monkeypatch.setenv("TESSELLM_NORM_FOLD2", env)
    backend_ops = {"cuda": CudaOps, "triton": TritonOps, "cpu": CpuOps}[ops]()
    ctx = SimpleNamespace(ops=backend_ops, dtype=dtype, quant_method=quant)
    assert norm_fold2_on(ctx) is want
