"""Packed formats: quantize/dequantize round trips and the AWQ/GPTQ bit layouts.

The AWQ and GPTQ packers below are written independently of ``tessellm.quantization`` (a loop
per nibble, the way AutoAWQ and AutoGPTQ write their files), so a layout mistake in the
library cannot hide behind a matching mistake in the test.
"""

from __future__ import annotations

import pytest
import torch

from tessellm.quantization.int4 import (act_order_perm, pack_awq, pack_gptq_zeros, unpack_awq,
                                        unpack_gptq_zeros)
from tessellm.quantization.packed import (Int4Weight, cat_segments, pack_int4, quantize_fp8,
                                          quantize_fp8_per_token, quantize_int4, quantize_int8,
                                          unpack_int4)


def _autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's WQLinear_GEMM packing: ``[in, out]`` -> ``[in, out / 8]``."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    packed = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int64)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + order_map[i]].long() << (i * 4)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _autogptq_pack_rows(intweight: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's qweight packing: ``[in, out]`` -> ``[in / 8, out]``, row 8r + j in nibble j."""
    packed = torch.zeros(intweight.shape[0] // 8, intweight.shape[1], dtype=torch.int64)
    for row in range(packed.shape[0]):
        for j in range(8):
            packed[row] |= intweight[row * 8 + j].long() << (4 * j)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _autogptq_pack_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's qzeros packing: ``[groups, out]`` -> ``[groups, out / 8]`` in column order."""
    packed = torch.zeros(zeros.shape[0], zeros.shape[1] // 8, dtype=torch.int64)
    for col in range(packed.shape[1]):
        for j in range(8):
            packed[:, col] |= zeros[:, col * 8 + j].long() << (4 * j)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _codes(*shape, seed=0):
    return torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(seed))


def test_int4_pack_round_trip_and_layout():
    q = _codes(64, 24)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (8, 24)
    assert torch.equal(packed, _autogptq_pack_rows(q))
    assert torch.equal(unpack_int4(packed).long(), q)


def test_awq_layout_matches_autoawq():
    q = _codes(32, 48, seed=1)
    assert torch.equal(pack_awq(q), _autoawq_pack(q))
    assert torch.equal(unpack_awq(_autoawq_pack(q)).long(), q)


def test_gptq_zeros_layout_matches_autogptq():
    z = _codes(4, 40, seed=2)
    assert torch.equal(pack_gptq_zeros(z), _autogptq_pack_zeros(z))
    assert torch.equal(unpack_gptq_zeros(_autogptq_pack_zeros(z)).long(), z)


@pytest.mark.parametrize("group", [None, 32])
def test_int8_round_trip_error_is_half_a_step(group):
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(3))
    q = quantize_int8(w, group)
    step = q.scales.t().repeat_interleave(q.group_size, dim=1)  # [N, K]
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() <= 127


def test_fp8_round_trip_relative_error():
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(4))
    q = quantize_fp8(w)
    assert q.qweight.dtype == torch.float8_e4m3fn
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal numbers
    err = (q.dequantize() - w).abs()
    assert (err <= w.abs() * 2**-4 + q.scales[:, None] * 2**-9).all()
    xq, sx = quantize_fp8_per_token(w)
    assert torch.allclose(xq.float() * sx[:, None], w, rtol=2**-4, atol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_round_trip(symmetric):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(5))
    q, s, z = quantize_int4(w, 128, symmetric=symmetric)
    seg = Int4Weight(pack_int4(q), s, None if symmetric else -z * s, 8 if symmetric else 0, 128)
    step = s.repeat_interleave(128, dim=0).t()
    assert ((seg.dequantize() - w).abs() <= step * 0.5 + 1e-6).all()


def test_act_order_perm_sorts_groups():
    g_idx = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0])
    perm = act_order_perm(g_idx, 4)
    assert torch.equal(g_idx[perm.long()], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert act_order_perm(torch.arange(8) // 4, 4) is None
    with pytest.raises(ValueError, match="exactly 4"):
        act_order_perm(torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]), 4)


def test_act_order_dequantize_undoes_perm():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
    q, s, z = quantize_int4(w, 32)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(7)).to(torch.int32)
    plain = Int4Weight(pack_int4(q), s, -z * s, 0, 32).dequantize()
    # rows of q stored in perm order; groups then follow the stored order
    permuted = Int4Weight(pack_int4(q), s, -z * s, 0, 32, perm)
    assert torch.equal(permuted.dequantize()[:, perm.long()], plain)


def test_cat_segments_merges_same_layout_only():
    a, b = quantize_int8(torch.randn(8, 32)), quantize_int8(torch.randn(4, 32))
    c = quantize_int8(torch.randn(4, 32), group_size=16)
    merged = cat_segments([a, b, c])
    assert [s.out_features for s in merged] == [12, 4]
    assert torch.equal(merged[0].dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
