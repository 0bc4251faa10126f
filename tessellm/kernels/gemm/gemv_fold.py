"""The one-row GEMVs with a residual-add RMSNorm split between them (``norm_fold.py``): the
producer (o_proj / down_proj) ends in ``FOLD_OUT``, the consumer (qkv_proj / gate_up_proj)
in ``FOLD_IN``. A 16-bit weight runs ``gemv._gemv_fma_kernel``, an e4m3fn one under a bf16 row
``gemv_x2._gemv_e4m3_x2_kernel``, each on the tiles its plain product takes; only the
epilogues differ from the plain launches.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from tessellm.kernels.gemm.common import _interpreted, _num_sms, _split_out, _split_stride, \
    _split_sum
from tessellm.kernels.gemm.gemv import GemvConfig, _launch, _ptx, _with_split, prewait_args
from tessellm.kernels.gemm.gemv_x2 import _gemv_e4m3_x2_kernel, _x2_checked, gemv_x2_config
from tessellm.kernels.gemm.norm_fold import (consume_applies, consumer_args, fold_applies,
                                             producer_args)
from tessellm.kernels.gemm.split_last import split_last_args, split_last_enabled, tile_counters
from tessellm.kernels.pdl import pdl_args


def _check_out(x, n, residual, norm_weight, name):
    if not fold_applies(x, n, residual, norm_weight):
        raise ValueError(f"{name}: one 16-bit row, a residual [1, {n}] of x's dtype and a norm "
                         f"weight [{n}]; got x {tuple(x.shape)} {x.dtype}, residual "
                         f"{tuple(residual.shape)} {residual.dtype}, weight "
                         f"{tuple(norm_weight.shape)}")


def _check_in(x, sumsq, name):
    if not consume_applies(x, sumsq):
        raise ValueError(f"{name}: one 16-bit row and float32 partial sums of a power-of-two "
                         f"count (a NormFold's); got x {tuple(x.shape)} {x.dtype}, sumsq "
                         f"{tuple(sumsq.shape)} {sumsq.dtype}")


def gemv_add_rms_norm_fold(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                           norm_weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                           config: Optional[GemvConfig] = None) -> tuple:
    """The producer's half for a 16-bit weight: with ``y = x @ weight.T (+ bias)`` rounded to
    x's dtype and ``h = round(y + residual)`` (stored into ``residual``), returns ``(round(h *
    norm_weight) [1, N], sumsq)``, ``sumsq`` float32 partial sums of ``h^2``."""
    if weight.dtype != x.dtype:
        raise TypeError(f"gemv: weight is {weight.dtype} but x is {x.dtype}; cast one of them")
    _check_out(x, weight.shape[0], residual, norm_weight, "gemv_add_rms_norm_fold")
    return _launch(x, weight, None, bias, config, w_ptx=False,
                   fold=("out", residual, norm_weight))


def gemv_rms_scaled(x: torch.Tensor, weight: torch.Tensor, sumsq: torch.Tensor, eps: float,
                    bias: Optional[torch.Tensor] = None, silu_and_mul: bool = False,
                    config: Optional[GemvConfig] = None) -> torch.Tensor:
    """The consumer's half for a 16-bit weight: ``(x @ weight.T) * rsqrt(sum(sumsq) / K +
    eps) (+ bias)``, then ``silu_and_mul`` for a stacked ``[gate; up]`` weight if asked."""
    if weight.dtype != x.dtype:
        raise TypeError(f"gemv: weight is {weight.dtype} but x is {x.dtype}; cast one of them")
    _check_in(x, sumsq, "gemv_rms_scaled")
    return _launch(x, weight, None, bias, config, w_ptx=False, silu_fold=silu_and_mul,
                   fold=("in", sumsq, eps))


def gemv_fp8_x2_add_rms_norm_fold(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                                  residual: torch.Tensor, norm_weight: torch.Tensor,
                                  bias: Optional[torch.Tensor] = None,
                                  config: Optional[tuple] = None) -> tuple:
    """``gemv_add_rms_norm_fold`` for e4m3fn weights with per-channel ``scales`` under one bf16
    row (``gemv_x2.gemv_fp8_x2``'s product and tiles, whole K a program)."""
    n, k = qweight.shape
    _check_out(x, n, residual, norm_weight, "gemv_fp8_x2_add_rms_norm_fold")
    block_n, block_kw, num_warps = tuple(config or gemv_x2_config(n, k))[:3]
    x = _x2_checked(x, qweight)
    kw = k // 4
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    grid = triton.cdiv(n, block_n)
    epi, sumsq = producer_args(grid, out, residual, norm_weight)
    _gemv_e4m3_x2_kernel[(grid, 1)](
        x, qweight, scales, bias if bias is not None else scales, out, n, kw,
        qweight.stride(0) // 4, kw, 0, HAS_BIAS=bias is not None,
        EVEN_K=kw % block_kw == 0, BLOCK_N=block_n, BLOCK_KW=block_kw, PTX=_ptx(x),
        SILU_FOLD=False, num_warps=num_warps, **epi, **prewait_args(x),
        **split_last_args(None, None, 0, scales), **pdl_args(x.device))
    return out, sumsq


def gemv_fp8_x2_rms_scaled(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           sumsq: torch.Tensor, eps: float, bias: Optional[torch.Tensor] = None,
                           silu_and_mul: bool = False,
                           config: Optional[tuple] = None) -> torch.Tensor:
    """``gemv_rms_scaled`` for e4m3fn weights under one bf16 row: ``gemv_fp8_x2``'s tiles and
    split, the split combined as it combines it (``gemv_fp8_x2_silu_and_mul``'s tiles, whole K
    a program, with ``silu_and_mul``). The scale is linear, so each K range's plane takes it."""
    n, k = qweight.shape
    _check_in(x, sumsq, "gemv_fp8_x2_rms_scaled")
    config = tuple(config or gemv_x2_config(n, k))
    block_n, block_kw, num_warps = config[:3]
    x = _x2_checked(x, qweight)
    kw = k // 4
    epi = consumer_args(sumsq, eps, x)
    y, combine = None, split_last_args(None, None, 0, scales)
    if silu_and_mul:
        if n % 2 or block_n % 2:
            raise ValueError(f"gemv_fp8_x2_rms_scaled: a stacked [gate; up] weight of an even "
                             f"row count and an even block_n, got {n} rows, block_n {block_n}")
        out = torch.empty(1, n // 2, dtype=x.dtype, device=x.device)
        grid, words, even = (triton.cdiv(n // 2, block_n // 2), 1), kw, kw % block_kw == 0
    else:
        if len(config) == 4:  # a split combined in the launch (gemv_x2_table.SPLIT_TABLE)
            split, last = config[3], True
        else:
            split = _with_split(GemvConfig(block_n, block_kw * 4, num_warps, 1), n, k,
                                1 if _interpreted(x) else _num_sms(x.device.index or 0)).split_k
            last = split_last_enabled()
        words = triton.cdiv(triton.cdiv(kw, block_kw), split) * block_kw
        split = triton.cdiv(kw, words)
        out = _split_out(x, 1, n, split)
        tiles = triton.cdiv(n, block_n)
        grid, even = (tiles, split), kw % words == 0
        if split > 1 and last:
            y = torch.empty(1, n, dtype=x.dtype, device=x.device)
            combine = split_last_args(y, tile_counters(x.device, qweight.data_ptr(), tiles),
                                      split, scales)
    _gemv_e4m3_x2_kernel[grid](
        x, qweight, scales, bias if bias is not None else scales, out,
        n // 2 if silu_and_mul else n, kw, qweight.stride(0) // 4, words, _split_stride(out),
        HAS_BIAS=bias is not None, EVEN_K=even, BLOCK_N=block_n, BLOCK_KW=block_kw,
        PTX=_ptx(x), SILU_FOLD=silu_and_mul, num_warps=num_warps, **epi, **prewait_args(x),
        **combine, **pdl_args(x.device))
    return y if y is not None else _split_sum(out, x.dtype)
