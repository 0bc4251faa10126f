"""``gemv_w8a8`` (up to 16 rows) skips widening the weight altogether: x is quantized per row to
e4m3 (inside the kernel, or before it) and the codes go straight into the fp8 tensor cores,
``acc[BN, 16] += dot(W codes, xq.T)``. It was built to break that instruction bound and measured
slower where it matters (H200, 2026-11-21, ``gemv_bench.py``, M = 1): 13.2 / 10.8 / 34.6 /
22.5 us on qkv / o / gate_up / down against W8A16's 10.6 / 7.9 / 35.1 / 21.0 (best swept tile
32.2 us on gate_up; on an e4m3 LM head 134.1, or 123.8 with x quantized before it, against
129.7); B1 3.549 against 3.192 ms. So it is off by default
(``quant_ops.FP8_SKINNY_W8A8_MAX_M``); it wins only on the largest N.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm.kernels.gemm.common import (_interpreted, _num_sms, _split_out, _split_stride,
                                          _split_sum)
from tessellm.kernels.gemm.gemv import (
    GemvConfig,
    _finish,
    _k_split,
    _load_k,
    _ptx,
    _split_plane,
    _store_tile,
    _with_split,
)
from tessellm.kernels.pdl import pdl_args, pdl_start


@triton.jit
def _round_e4m3(v):
    """float32 in [-448, 448] -> the nearest e4m3fn value (ties to even), still float32: the
    cast after it is then exact. Only for Triton's interpreter, whose float32 -> e4m3 cast
    drops the carry when rounding up crosses a power of two (31.6 -> 16); GPUs round right.
    Normal range: round the float32 bits to 3 mantissa bits; below 2^-6: to multiples of 2^-9."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23: adding it rounds to an integer, ties to even
    sub = ((v * 512.0 + magic) - magic) / 512.0
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def _row_scales(x_ptr, M, K, stride_xm, FP8_MAX: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK: tl.constexpr):
    """Per-row dynamic fp8 scales ``max(|x[m]|) / FP8_MAX`` (``fp8.quantize_fp8_rows``'
    formula) of the first M rows, 1.0 past them; each row read once, [BLOCK] at a time."""
    rm = tl.arange(0, BLOCK_M)
    scale = tl.full([BLOCK_M], 1.0, tl.float32)
    for r in range(0, M):
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + r * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.where(rm == r, tl.maximum(tl.max(amax, 0), 1e-12) / FP8_MAX, scale)
    return scale


@triton.jit
def _gemv_w8a8_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                      stride_wn, stride_om, stride_split, k_per_split,
                      FP8_MAX: tl.constexpr, X_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                      NATIVE: tl.constexpr, SCALE_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """W8A8 on the fp8 tensor cores: ``acc[BN, BM] += dot(W codes, xq.T)``, then
    ``y = acc.T * sx[m] * sw[n]``. X_QUANT: x is 16-bit and quantized here per row (each
    program first reads the rows for their scales, then quantizes its K tiles as it goes);
    otherwise x holds e4m3 codes already and ``xs`` their row scales. NATIVE: the dot takes the
    e4m3 tiles as they are (sm89+); else both are widened to float32, exactly (interpreter)."""
    pdl_start(USE_PDL)
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # [BM, 1]; rows past M masked
    if X_QUANT:
        sx = _row_scales(x_ptr, M, K, stride_xm, FP8_MAX, BLOCK_M, SCALE_BLOCK)
    else:
        sx = tl.load(xs_ptr + rm, mask=rm < M, other=1.0)
    inv = 1.0 / sx
    k_lo, steps = _k_split(pid_k, k_per_split, K, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in tl.range(0, steps, num_stages=STAGES):
        koff = k_lo + i * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        w = _load_k(w_rows + koff, koff, K, EVEN_K)
        x = tl.load(x_rows + koff, mask=(rm[:, None] < M) & (koff < K), other=0.0)
        if X_QUANT:
            x = tl.minimum(tl.maximum(x.to(tl.float32) * inv[:, None], -FP8_MAX), FP8_MAX)
            if not NATIVE:
                x = _round_e4m3(x)
            x = x.to(w.dtype)
        if NATIVE:
            acc += tl.dot(w, tl.trans(x))
        else:
            acc += tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
    y = tl.trans(acc) * sx[:, None]
    y = _finish(y, s_ptr, bias_ptr, rn, N, pid_k, True, False, HAS_BIAS)
    _store_tile(y, _split_plane(out_ptr, pid_k, stride_split), rm, rn, M, N, stride_om)


def w8a8_native(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """The fp8 tensor cores can take e4m3 tiles here: compiled, NVIDIA sm89+, e4m3fn."""
    return (_ptx(x) and qweight.dtype == torch.float8_e4m3fn
            and torch.cuda.get_device_capability(x.device.index or 0) >= (8, 9))


def w8a8_config(m: int, n: int, k: int, num_sms: int = 132) -> GemvConfig:
    """Tiles of ``gemv_w8a8``: 64 weight rows (one warpgroup's MMA), 256 codes of K a step."""
    if m > 16:
        raise ValueError(f"gemv_w8a8 serves at most 16 rows, got {m}; use a GEMM")
    return _with_split(GemvConfig(block_n=64, block_k=256, num_warps=4, stages=4, dot=True),
                       n, k, num_sms)


def gemv_w8a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              bias: Optional[torch.Tensor] = None, x_scales: Optional[torch.Tensor] = None,
              config: Optional[GemvConfig] = None) -> torch.Tensor:
    """W8A8 for up to 16 rows: ``(q(x) @ qweight.T) * sx[:, None] * scales[None, :] (+ bias)``
    with ``q(x)`` e4m3 per row at ``sx = max|x[m]| / 448`` (the prefill path's quantization).
    ``qweight`` e4m3fn ``[N, K]``, ``scales`` float32 ``[N]``. x is 16-bit or float32 and
    quantized inside the kernel; or x holds e4m3 codes already and ``x_scales`` their scales.
    Output in x's dtype (bfloat16 for e4m3 x)."""
    m, k = x.shape
    n = qweight.shape[0]
    if qweight.shape[1] != k or qweight.stride(1) != 1:
        raise ValueError(f"gemv_w8a8: weight must be a row-major [N, {k}] matrix, got shape "
                         f"{tuple(qweight.shape)} strides {qweight.stride()}")
    x_quant = x_scales is None
    if x_quant == (x.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)):
        raise TypeError("gemv_w8a8: pass x_scales exactly when x holds e4m3 codes")
    out_dtype = x.dtype if x_quant else torch.bfloat16
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype, device=x.device)
    x = x.contiguous()
    cfg = config or w8a8_config(m, n, k, 1 if _interpreted(x) else _num_sms(x.device.index or 0))
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    out = _split_out(x, m, n, split, out_dtype)
    _gemv_w8a8_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, x_scales if x_scales is not None else scales, qweight, scales,
        bias if bias is not None else scales, out, m, n, k, x.stride(0), qweight.stride(0),
        out.stride(-2), _split_stride(out), k_per_split, FP8_MAX=torch.finfo(qweight.dtype).max,
        X_QUANT=x_quant, HAS_BIAS=bias is not None, EVEN_K=k % k_per_split == 0,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        STAGES=cfg.stages, NATIVE=w8a8_native(x, qweight),
        SCALE_BLOCK=2048 if not _interpreted(x) else 64, num_warps=cfg.num_warps,
        num_stages=cfg.stages, **pdl_args(x.device))
    return _split_sum(out, out_dtype)
