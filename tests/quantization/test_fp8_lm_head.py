"""The fp8 LM head (``TESSELLM_FP8_LM_HEAD=1`` with ``quantization="fp8"``,
``loader.model_loader._fp8_lm_head``): the head keeps a per-row e4m3 copy and takes it where the
backend's fp8 product is weight-only at that row count (cuda: decode, up to 32 rows), the dense
weight elsewhere (the cpu: everywhere, its fp8 being W8A8); each weight-only row's 16 largest
logits recomputed from the dense weight. Checked on the hidden states the head received during
generation against float64 oracles (W8A16 of the e4m3 copy, the dense product), untied and tied; the product itself with the Triton QuantOps (in the interpreter on
the CPU: W8A16 at 1-2 rows, dense above); off by default; other schemes warn. Perplexity on
SmolLM2: docs/quantization.md."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from tessellm import LLM, SamplingParams
from tessellm.layers.vocab import ParallelLMHead
from tessellm.quantization.packed import Fp8Weight
from tests.gpu_set import GPU_WHEN_PRESENT

ON_GPU = torch.cuda.is_available()
pytestmark = GPU_WHEN_PRESENT  # every test runs on the GPU where there is one
# On a GPU the cuda backend in bf16 (its one-row e4m3 GEMV takes bf16); on the CPU float32.
# Eager: the forward hook below must see every decode step (a graph replay runs no hook).
KW = dict(device="cuda" if ON_GPU else "cpu", dtype="bfloat16" if ON_GPU else "float32",
          max_model_len=128, num_kv_blocks=32, max_num_seqs=2, enforce_eager=True)
PROMPT = [[(5 * j + 3) % 384 for j in range(9)]]
W8A16_MAX_ROWS = 32 if ON_GPU else 0  # where the backend's fp8_mm is weight-only (cpu: never)


def _head(llm) -> ParallelLMHead:
    return next(m for m in llm.engine.core.runner.model.modules()
                if isinstance(m, ParallelLMHead))


def _oracle(x: torch.Tensor, dense: torch.Tensor, w8a16_max_rows: int) -> torch.Tensor:
    """W8A16 of the per-row e4m3 copy up to ``w8a16_max_rows`` rows (x as it is), else the
    dense product; float64 sums."""
    x, dense = x.double().cpu(), dense.double().cpu()
    if x.shape[0] > w8a16_max_rows:
        return x @ dense.t()
    fmax = torch.finfo(torch.float8_e4m3fn).max
    ws = dense.abs().amax(1) / fmax
    wq = (dense / ws[:, None]).float().clamp(-fmax, fmax).to(torch.float8_e4m3fn)
    return (x @ wq.double().t()) * ws[None, :]


def _check(out: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, w8a16_max_rows: int,
           tol: dict, e4m3_product=None) -> None:
    """Dense rows: the dense product. Weight-only rows: each logit the W8A16 oracle's or, for
    the e4m3 copy's 16 largest of the row (``FP8_HEAD_REFINE``), the dense product's.
    ``e4m3_product(x)``: the backend's own product of the e4m3 copy (on a GPU: its bf16 GEMV),
    whose top 16 are the ones refined: its order, not the float64 oracle's (which on a tiny
    random model's clustered logits may rank two near-equal logits the other way)."""
    from tessellm.loader.model_loader import FP8_HEAD_REFINE

    out = out.double().cpu()
    dense_ref = _oracle(x, dense, 0)
    if x.shape[0] > w8a16_max_rows:
        torch.testing.assert_close(out, dense_ref, **tol)
        return
    fp8_ref = _oracle(x, dense, w8a16_max_rows)
    # a low-precision sum's error scales with the sum of its terms' sizes, not with the result:
    # a logit near zero out of large terms is off by ~eps x sum |x_i w_i| (``tol["terms"]``)
    terms = x.double().cpu().abs() @ dense.double().cpu().abs().t()
    near = lambda a, b, t=terms: ((a - b).abs() <= tol["atol"] + tol["rtol"] * b.abs()  # noqa: E731
                                  + tol.get("terms", 0.0) * t)
    ok = near(out, fp8_ref) | near(out, dense_ref)
    bad = (~ok).nonzero().tolist()[:4]
    assert ok.all(), (f"{int((~ok).sum())} of {ok.numel()} logits ({x.shape[0]} rows) near "
                      f"neither oracle, e.g. [row, id] out / W8A16 / dense: "
                      + "; ".join(f"{b} {float(out[b[0], b[1]]):.5f} / "
                                  f"{float(fp8_ref[b[0], b[1]]):.5f} / "
                                  f"{float(dense_ref[b[0], b[1]]):.5f}" for b in bad))
    if e4m3_product is not None:
        # the backend's e4m3 product (its values checked against the oracles just above, as
        # ``out``'s), its 16 largest refined from the dense head, every other logit its own
        product = e4m3_product(x).double().cpu()
        top = product.topk(FP8_HEAD_REFINE, dim=-1).indices
        rest = torch.ones_like(out, dtype=torch.bool).scatter_(1, top, False)
        torch.testing.assert_close(out[rest], product[rest], rtol=8e-3, atol=1e-5)
        # the refined ones: the dense product's to bf16's rounding (the e4m3 copy's own are
        # off by its 3-bit mantissa, several times more)
        scale = dense_ref.abs().amax(1, keepdim=True)
        got, want = out.gather(1, top), dense_ref.gather(1, top)
        assert ((got - want).abs() <= 8e-3 * want.abs() + 1e-3 * scale).all(), \
            "top logits: the dense head's"
    else:
        # the e4m3 copy's top logits were refined (its 16 largest, 12 kept clear of near-ties
        # at the edge, where the kernel and the oracle may order two logits differently)
        top = fp8_ref.topk(FP8_HEAD_REFINE - 4, dim=-1).indices
    assert near(out.gather(1, top), dense_ref.gather(1, top), terms.gather(1, top)).all(), \
        "top logits: the dense head's"
    assert not near(out, dense_ref).all(), "the other logits come from the e4m3 copy"


@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_fp8_lm_head_logits(tiny_model_dir, monkeypatch, arch):
    monkeypatch.setenv("TESSELLM_FP8_LM_HEAD", "1")
    llm = LLM(tiny_model_dir(arch), quantization="fp8", **KW)
    head = _head(llm)
    dense = head.tied if head.tied is not None else head.weight
    assert (head.tied is not None) == (arch == "llama-tied")
    seg = head.quant_weight
    assert isinstance(seg, Fp8Weight) and seg.qweight.dtype == torch.float8_e4m3fn
    assert seg.qweight.shape == dense.shape
    # e4m3 keeps 3 mantissa bits: each weight within 1/16 of itself (or of the row scale's
    # subnormal step near zero)
    err = (seg.dequantize() - dense.float()).abs()
    assert (err <= dense.float().abs() / 16 + seg.scales[:, None] / 8).all()
    assert dense.abs().sum() > 0  # the dense copy stays (tied: it is the embedding)

    seen = []
    hook = head.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(),
                                                                        out.clone())))
    out = llm.generate([{"prompt_token_ids": p} for p in PROMPT],
                       SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1),
                       use_tqdm=False)[0]
    hook.remove()
    assert len(out.outputs[0].token_ids) == 4 and len(seen) >= 4
    # float32 on the CPU: the oracle's own rounding; bf16 on a GPU: the logits' rounding and
    # the one-row GEMV's bf16 pair products (relative 2.6e-3, docs/quantization.md)
    tol = dict(rtol=2e-2, atol=2e-3, terms=4e-3) if ON_GPU else dict(rtol=1e-4, atol=1e-5)
    product = None
    if ON_GPU:  # the backend's e4m3 product, as the head's fp8_head_mm calls it
        from tessellm.quantization.loading import quantized_linears

        ops = next(iter(quantized_linears(llm.engine.core.runner.model).values())).quant_method.ops
        product = lambda x: ops.fp8_mm(x, seg).to(x.dtype)  # noqa: E731
    for hidden, logits in seen:
        assert logits.shape == (hidden.shape[0], dense.shape[0])
        _check(logits, hidden, dense.detach(), W8A16_MAX_ROWS, tol, product)
    assert seen[-1][0].shape[0] == 1  # a decode row (on a GPU: through the e4m3 copy)
    # the sampled greedy tokens are the argmax of those logits
    last = [lg[-1].argmax().item() for _, lg in seen[:4]]
    assert out.outputs[0].token_ids == last


def test_fp8_head_product_w8a16_rows_then_dense():
    """``fp8_head_mm`` with the Triton QuantOps: its W8A16 kernels up to
    ``fp8_weight_only_max_m`` rows, the dense product above (CPU tensors: the interpreter)."""
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    from tessellm.kernels.gemm.quant_ops import TritonQuantOps
    from tessellm.loader.model_loader import fp8_head_mm
    from tessellm.quantization.packed import quantize_fp8

    dev = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    gen = torch.Generator().manual_seed(5)
    dense = (torch.randn(200, 64, generator=gen) * 0.05).to(dtype).to(dev)
    seg = quantize_fp8(dense)
    mm = fp8_head_mm(TritonQuantOps(use_scaled_mm=False, fp8_weight_only_max_m=2), dense,
                     F.linear)
    tol = dict(rtol=2e-2, atol=2e-3) if ON_GPU else dict(rtol=1e-5, atol=1e-6)
    for rows in (1, 2, 3, 5):
        x = torch.randn(rows, 64, generator=gen).to(dtype).to(dev)
        out = mm(x, seg)
        _check(out, x, dense, 2, tol)
        if rows > 2:
            assert torch.equal(out, F.linear(x, dense))


def test_fp8_lm_head_off_by_default(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("TESSELLM_FP8_LM_HEAD", raising=False)
    llm = LLM(tiny_model_dir("llama"), quantization="fp8", **KW)
    assert _head(llm).quant_mm is None


def test_fp8_lm_head_other_scheme_warns(tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setenv("TESSELLM_FP8_LM_HEAD", "1")
    with caplog.at_level(logging.WARNING, logger="tessellm.loader.model_loader"):
        llm = LLM(tiny_model_dir("llama"), quantization="int8", **KW)
    assert _head(llm).quant_mm is None
    assert any("TESSELLM_FP8_LM_HEAD=1 applies to quantization='fp8'" in r.getMessage()
               for r in caplog.records)
