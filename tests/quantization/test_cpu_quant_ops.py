"""The cpu backend's quantized GEMMs (torch's CPU int4 kernel) against the dequantized weight.

The repacked products round x, the scales and the result to bfloat16, so they are compared with
a bfloat16-sized tolerance against ``x @ dequantize(w).T`` in float32: a wrong zero point, a
swapped nibble or a group misplaced is off by the size of the weights, far outside it. The
bundled model's greedy tokens against the dequantized float32 model are checked in
``tests/quantization/test_gguf.py``.
"""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from tessellm.backends.cpu.quant_ops import CpuQuantOps, repack_int4, repack_int8  # noqa: E402
from tessellm.quantization.gguf import segment_from_blocks  # noqa: E402
from tessellm.quantization.packed import Int4Weight, pack_int4, quantize_int8  # noqa: E402

Q = gguf.GGMLQuantizationType
N, K = 48, 256


def _blocks(qtype):
    import numpy as np

    rng = np.random.default_rng(3)
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        return gguf.quants.quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.05, qtype)
    raw = rng.integers(0, 256, (N, K // 256, 144), dtype=np.uint8)
    raw[..., 0:4] = rng.uniform(1e-3, 1e-2, (N, K // 256, 2)).astype(np.float16).view(np.uint8)
    return raw.reshape(N, -1)


def _check(out: torch.Tensor, x: torch.Tensor, w_dense: torch.Tensor) -> None:
    ref = x @ w_dense.t()
    # bf16 rounding of x (2^-9 relative) summed over K terms, plus the output's own rounding
    bound = 2.0 ** -7 * (x.abs() @ w_dense.abs().t()) + 2.0 ** -8 * ref.abs()
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert bool(((out - ref).abs() <= bound + 1e-6).all()), (out - ref).abs().max()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 5])
def test_gguf_segment_through_int4pack(qtype, m):
    seg = segment_from_blocks(qtype, _blocks(qtype), (N, K))
    assert (repack_int4(seg) if seg.kind == "int4" else repack_int8(seg)) is not None
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m))
    out = getattr(CpuQuantOps(), f"{seg.kind}_mm")(x, seg)
    _check(out, x, seg.dequantize(torch.float32))


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K, Q.Q8_0], ids=lambda q: q.name)
def test_repack_releases_the_codes_and_dequantize_is_unchanged(qtype):
    """After its first product a segment holds its 4-bit codes once (in the repack): qweight's
    storage is one element, and dequantize rebuilds the very same weight from the repack."""
    seg = segment_from_blocks(qtype, _blocks(qtype), (N, K))
    want, shape = seg.dequantize(torch.float32), seg.qweight.shape
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(4))
    first = getattr(CpuQuantOps(), f"{seg.kind}_mm")(x, seg)
    assert seg.qweight.shape == shape and seg.qweight.untyped_storage().nbytes() <= 4
    assert torch.equal(seg.dequantize(torch.float32), want)
    assert torch.equal(getattr(CpuQuantOps(), f"{seg.kind}_mm")(x, seg), first)


def test_int4_with_offsets_and_zero_point_and_bias():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (K, N), dtype=torch.int32, generator=g)
    scales = torch.rand(K // 64, N, generator=g) * 0.02
    offsets = torch.randn(K // 64, N, generator=g) * 0.05
    seg = Int4Weight(pack_int4(q), scales, offsets, zero_point=3, group_size=64)
    x, bias = torch.randn(4, K, generator=g), torch.randn(N, generator=g)
    out = CpuQuantOps().int4_mm(x, seg, bias)
    _check(out - bias, x, seg.dequantize(torch.float32))


def test_unsupported_layouts_take_the_reference_path():
    """Per-channel int8 and groups of 16 (Q6_K) have no int4-kernel form: exact float32 results."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(2))
    for seg in (quantize_int8(w), quantize_int8(w, group_size=16)):
        assert repack_int8(seg) is None
        ref = x @ seg.dequantize(torch.float32).t()
        assert torch.allclose(CpuQuantOps().int8_mm(x, seg), ref, rtol=1e-5, atol=1e-5)


def test_bundled_model_head_reads_the_q8_0_blocks(bundled_model):
    """quantization="gguf" on the cpu: the tied LM head is the file's Q8_0 token embedding."""
    from tessellm.entrypoints.llm import LLM

    llm = LLM(bundled_model, quantization="gguf", dtype="float32", max_model_len=64,
              num_kv_blocks=16, max_num_seqs=2)
    model = llm.engine.core.runner.model
    head = next(m for m in model.modules() if type(m).__name__ == "ParallelLMHead")
    assert head.quant_weight is not None and head.quant_weight.kind == "int8"
    assert torch.equal(head.quant_weight.dequantize(torch.float32), head.tied.data)
    hidden = torch.randn(3, head.tied.shape[1])
    _check(head(hidden), hidden, head.tied.data)


@pytest.mark.slow
def test_bundled_gguf_compiled_decode_equals_eager(bundled_model, monkeypatch):
    """TESSELLM_CPU_COMPILE=1 with quantization="gguf": the compiled batch-1 decode step (the
    int4 kernel inside the graph, the codes released) gives eager's greedy tokens (~2 min)."""
    from tessellm.entrypoints.llm import LLM
    from tessellm.testing.harness import greedy_tokens

    kw = dict(quantization="gguf", dtype="float32", max_model_len=128, num_kv_blocks=16,
              max_num_seqs=1)
    prompts = [[1, 504, 3458, 314, 260], list(range(2000, 2040))]
    eager = greedy_tokens(LLM(bundled_model, enforce_eager=True, **kw), prompts, 12)
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "1")
    llm = LLM(bundled_model, **kw)
    assert llm.engine.core.runner.graph_runner is not None
    assert greedy_tokens(llm, prompts, 12) == eager
    layer = llm.engine.core.runner.model.layers[0].mlp.down_proj
    assert layer.segments[0].qweight.untyped_storage().nbytes() <= 4


@pytest.mark.parametrize("kernel", [True, False], ids=["int4pack", "reference"])
def test_lm_head_refines_the_top_logits_in_float32(kernel, monkeypatch):
    """``lm_head_mm`` on a Q8_0 head with float32 activations: through the kernel (repacked on
    this, its first, call) the top ``REFINE`` logits of each row are recomputed from the dense
    weight, so they equal the float32 products; through the reference path (kernel off) the
    logits are the reference's own, untouched."""
    from tessellm.backends.cpu.quant_ops import REFINE, repacked
    from tessellm.backends.reference.quant_ops import TorchQuantOps

    if not kernel:
        monkeypatch.setenv("TESSELLM_CPU_INT4PACK", "0")
    seg = segment_from_blocks(Q.Q8_0, _blocks(Q.Q8_0), (N, K))
    dense = seg.dequantize(torch.float32)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(5))
    assert not repacked(seg)
    out = CpuQuantOps().lm_head_mm(x, seg, dense)
    assert out.dtype == torch.float32 and repacked(seg) == kernel
    ref = x @ dense.t()
    if not kernel:
        assert torch.equal(out, TorchQuantOps().int8_mm(x, seg))
        return
    bf16 = CpuQuantOps().int8_mm(x, seg)  # the kernel's logits, before the refinement
    top = bf16.topk(REFINE, dim=-1).indices
    assert not torch.allclose(bf16.gather(-1, top), ref.gather(-1, top), rtol=0, atol=1e-6)
    assert torch.allclose(out.gather(-1, top), ref.gather(-1, top), rtol=1e-6, atol=1e-6)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_direct_apply_is_the_generic_apply_bitwise(bundled_model):
    """quantization="gguf" on the cpu: after a layer's first product (which repacks it) its
    products skip the generic ``apply`` (``direct_apply``), with the same bits; a bias or 3-D x
    still takes the generic path."""
    from tessellm.backends.cpu import quant_ops
    from tessellm.entrypoints.llm import LLM

    llm = LLM(bundled_model, quantization="gguf", dtype="float32", max_model_len=64,
              num_kv_blocks=16, max_num_seqs=2, enforce_eager=True)
    layer = llm.engine.core.runner.model.layers[1].mlp.gate_up_proj
    method = layer.quant_method
    generic = method.apply.__closure__[0].cell_contents  # the generic apply direct_apply wraps
    x = torch.randn(3, layer.input_size, generator=torch.Generator().manual_seed(1))
    want = generic(layer, x)  # repacks the segment
    assert quant_ops.repacked(layer.segments[0])
    first = method.apply(layer, x)  # makes the direct entry
    assert quant_ops._DIRECT in layer.__dict__
    assert torch.equal(first, want) and torch.equal(method.apply(layer, x), want)
    assert torch.equal(method.apply(layer, x[None])[0], want)
    bias = torch.randn(want.shape[-1])
    assert torch.equal(method.apply(layer, x, bias), generic(layer, x, bias))


def test_outputs_not_a_multiple_of_16_take_the_reference_path():
    """The CPU int4 kernel packs 16 output rows a tile: an int4 segment of 8 outputs (a Mamba
    in_proj's dt part) and a grouped int8 one of 24 run the float32 reference instead."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (K, 8), dtype=torch.int32, generator=g)
    seg = Int4Weight(pack_int4(q), torch.rand(K // 64, 8, generator=g) * 0.02, None, 8, 64)
    x = torch.randn(2, K, generator=g)
    assert repack_int4(seg) is None
    ref = x @ seg.dequantize(torch.float32).t()
    assert torch.allclose(CpuQuantOps().int4_mm(x, seg), ref, rtol=1e-5, atol=1e-5)
    seg8 = quantize_int8(torch.randn(24, K, generator=g), group_size=64)
    assert repack_int8(seg8) is None
