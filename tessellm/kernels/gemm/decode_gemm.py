"""A tile GEMM for decode-sized row counts (3 to a few hundred rows), with an optional
SiLU-and-mul epilogue for a stacked ``[gate; up]`` weight (a "dual" GEMM: one launch instead of
the GEMM and ``silu_and_mul``, and no ``[M, 2I]`` intermediate written and read back).

Why (issue 22, F and L at batch 256, benchmarks/results/h200-2026-12-04-wave2c/probe2): cuBLAS
runs the batch-256 decode step's o projection (``[256, 4096] x [4096, 4096]``) at ~390 TFLOP/s
with 96 programs on 132 SMs (its 96x128 tiles; 22.3 us where the weight read alone is 7.5 us),
and gate_up's output then goes through a separate SiLU-and-mul launch (5.9 us a layer, 0.19 ms a
step). Here a program owns a ``BLOCK_M x BLOCK_N`` output tile over the whole of K (no split-K:
the SiLU epilogue needs whole sums) and the launch shape is picked so the grid fills the SMs
(``decode_gemm_config``). Whether that beats cuBLAS is a GPU measurement
(``benchmarks/kernels/decode_gemm_bench.py``), so the engine takes it only under
``TESSELLM_DECODE_GEMM`` (``tessellm.envs.decode_gemm``; default off).

Numerics: float32 accumulation over K in tile order (not cuBLAS's order, so bf16 outputs differ
from ``F.linear``'s in the last bit); the bias added in float32 before the one rounding; the
SiLU epilogue rounds gate and up to the output dtype as stored GEMM outputs would be, then
combines them as ``activation._silu_and_mul_kernel`` does (``silu_mul``), so it is the plain
kernel followed by ``silu_and_mul`` bitwise.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm.kernels.activation import silu_mul
from tessellm.kernels.gemm.common import _dot_args, _interpreted, _num_sms
from tessellm.kernels.pdl import pdl_args, pdl_launch, pdl_wait


@dataclasses.dataclass(frozen=True)
class DecodeGemmConfig:
    """A launch shape: output tile ``block_m x block_n`` (with ``silu``: block_n gate columns
    and their block_n up columns), K step ``block_k``, warps, software-pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def tiles(self, m: int, n: int) -> int:
        return triton.cdiv(m, self.block_m) * triton.cdiv(n, self.block_n)


def decode_gemm_config(m: int, n: int, k: int, silu: bool, num_sms: int,
                       interpreted: bool = False) -> DecodeGemmConfig:
    """The default launch shape for ``[m, k] x [k, n]`` (``n``: output columns; with ``silu``
    the weight has 2n rows). 64-row tiles up to 64 rows, else 128; 128-column tiles where they
    already give every SM a program, else 64 (the o projection at 256 rows: 128 programs
    instead of 64). The dual kernel keeps 64 columns (two float32 accumulators)."""
    if interpreted:
        return DecodeGemmConfig(16, 16, 16, 1, 1)
    bm = 64 if m <= 64 else 128
    bn = 128
    if silu or triton.cdiv(m, bm) * triton.cdiv(n, 128) < num_sms:
        bn = 64
    return DecodeGemmConfig(bm, bn, 64, 8 if bn == 128 else 4, 4)


@triton.jit
def _decode_gemm_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
                        stride_om, up_offset,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                        DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr):
    """out[M, N] = x[M, K] @ w[N, K]^T (+ bias); with SILU, out[M, N] = silu_and_mul of the
    product with w's rows [0, N) (gate) and [up_offset, up_offset + N) (up). The M tiles of one
    N tile are neighbouring programs, so the weight tile they share is read from DRAM once."""
    pdl_wait(USE_PDL)
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SILU:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = (kk < K) | EVEN_K  # K a multiple of BLOCK_K: no K mask to evaluate
        x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_FP32:  # bf16 under the interpreter (numpy has no bf16 dot): exact in float32
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
        if SILU:
            w_up = tl.load(w_cols + up_offset * stride_wn + kk[:, None],
                           mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_FP32:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(x, w_up, acc_up, input_precision=DOT_PREC)
    pdl_launch(USE_PDL)  # the successor may launch once every program is past its K loop
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc_up += tl.load(bias_ptr + up_offset + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dt = out_ptr.dtype.element_ty
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SILU:
        gate = acc.to(dt).to(tl.float32)
        up = acc_up.to(dt).to(tl.float32)
        tl.store(out_ptrs, silu_mul(gate, up, dt), mask=mask)
    else:
        tl.store(out_ptrs, acc.to(dt), mask=mask)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool,
            config: Optional[DecodeGemmConfig]) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"decode_gemm: x must be [M, K], got shape {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"decode_gemm: weight is {weight.dtype} but x is {x.dtype}; cast one of them")
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"decode_gemm: weight must be a row-major [N, {k}] matrix, got shape "
                         f"{tuple(weight.shape)} strides {weight.stride()}")
    n = weight.shape[0]
    if silu:
        if n % 2:
            raise ValueError(f"decode_gemm_silu_and_mul: a stacked [gate; up] weight has an even "
                             f"row count, got {n}")
        n //= 2
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    interpreted = _interpreted(x)
    cfg = config or decode_gemm_config(
        m, n, k, silu, 1 if interpreted else _num_sms(x.device.index or 0), interpreted)
    dot = _dot_args(x)
    _decode_gemm_kernel[(cfg.tiles(m, n),)](
        x, weight, bias if bias is not None else x, out, m, n, k, x.stride(0), weight.stride(0),
        out.stride(0), n, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0, HAS_BIAS=bias is not None, SILU=silu, DOT_FP32=dot["DOT_FP32"],
        DOT_PREC=dot["DOT_PREC"], num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_args(x.device))
    return out


def decode_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                config: Optional[DecodeGemmConfig] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for x ``[M, K]`` and a row-major weight ``[N, K]``."""
    return _launch(x, weight, bias, False, config)


def decode_gemm_silu_and_mul(x: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor] = None,
                             config: Optional[DecodeGemmConfig] = None) -> torch.Tensor:
    """``silu_and_mul(x @ weight.T + bias)`` for a stacked ``[gate; up]`` weight ``[2I, K]``:
    returns ``[M, I]``, bitwise ``silu_and_mul(decode_gemm(x, weight, bias))``."""
    return _launch(x, weight, bias, True, config)
