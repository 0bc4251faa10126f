"""The residual-add RMSNorm folded into the one-row GEMV that follows it: an experiment, measured
SLOWER than the two launches it replaces, so the engine does not use it (issue 22, wave 2g).

A decoder layer runs ``h = x + residual; y = W @ (g * norm(h))`` twice (input norm -> qkv,
post-attention norm -> gate_up). Unfused that is two launches; the norm's ~1.8 us is mostly
launch and drain. Here every program of the GEMV forms the norm's input itself, for one row::

    program p (outputs n = p*BN .. p*BN+BN-1), K loop over the whole row:
        h[k]  = round(x[k] + residual[k])            (the residual's dtype, as the unfused add)
        ss   += h[k]^2                               (float32)
        acc_n += W[n, k] * h[k] * g[k]               (float32, h not rounded after the norm)
    y[n] = acc_n * rsqrt(ss / K + eps) (+ bias[n])
    program 0 then stores h to ``new_residual`` (a new buffer: the others still read the old
    residual; a store inside the loop kept the compiler from issuing the weight loads first)

Deterministic: no atomics, every program sums the same squares in the same order. Not
bit-equal to ``fused_add_rms_norm`` + ``gemv``: the normalized row is not rounded to 16 bits
before the product (closer to the float64 result). One row, 16-bit, no split-K.

Measured on an H200 (``benchmarks/kernels/decode_chain.py --fold``, Llama-3.1-8B B1 chain,
2026-12-04, ``benchmarks/README.md`` "wave 2g"): the two norms cost 0.116 ms a token (chain
3.938 against 3.822 without them), but the fold makes each qkv / gate_up GEMV ~6.6 us slower
(chain 4.245; the best of 13 launch shapes, block_k 512, 4.231; larger tiles, a register
prefetch of the next weight tile and a register cap were all slower still). The K loop's
instructions double (sm_90 SASS: 135 against 65 a 4 KB weight step at block_n 2; 40 registers
against 28), and the step runs as "all programs wait for memory, then all compute": the extra
arithmetic on x, residual and g, redone by each of the 3,072 (qkv) / 14,336 (gate_up) programs,
does not hide under the weight reads. Capping registers at 32 made it far slower (6.2 ms: loads
serialized), which says the loop is latency-bound, not bandwidth-bound. A fold that pays needs
the norm formed once per step (not once per program) and out of the weight loop's critical
path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tessellm.kernels.gemm.common import _interpreted
from tessellm.kernels.gemm.gemv import _load_k, _ptx, _to_f32
from tessellm.kernels.pdl import pdl_args, pdl_start


@dataclass(frozen=True)
class NormGemvConfig:
    """Launch shape of ``gemv_add_rms_norm`` (the FMA tile of ``gemv.py`` with a chunk)."""

    block_n: int  # weight rows (outputs) per program
    block_k: int  # K elements per loop step (a power of two, a multiple of chunk)
    num_warps: int
    chunk: int = 8  # each thread sums its run of this many K elements every step
    prefetch: bool = False  # load the next step's weight tile before this step's vectors
    maxnreg: int | None = None  # registers a thread at most (more programs an SM)


# The launch shape (the best of 13 in ``decode_chain.py --fold``, within 0.3% of block_k 512).
NORM_GEMV_CONFIG = NormGemvConfig(block_n=2, block_k=1024, num_warps=4)


@triton.jit
def _add_rows(x_ptr, res_ptr, vo, koff, K, out_dtype: tl.constexpr, EVEN_K: tl.constexpr,
              PTX: tl.constexpr):
    """h = x + residual at K offsets ``vo`` (a tile of the weight tile's shape whose rows are
    the same addresses: it takes the weight tile's registers), rounded to ``out_dtype``."""
    x = _to_f32(_load_k(x_ptr + vo, koff, K, EVEN_K), PTX)
    r = _to_f32(_load_k(res_ptr + vo, koff, K, EVEN_K), PTX)
    return (x + r).to(out_dtype)


@triton.jit
def _gemv_add_rms_norm_kernel(x_ptr, res_ptr, g_ptr, w_ptr, bias_ptr, out_ptr, res_out_ptr,
                              N, K, stride_wn, eps,
                              HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              CHUNK: tl.constexpr, PREFETCH: tl.constexpr, PTX: tl.constexpr,
                              USE_PDL: tl.constexpr):
    """One row: ``out = W @ (g * rmsnorm(x + res)) (+ bias)``, ``res_out = x + res``.
    The K loop only loads (no store in it: a store would keep the compiler from issuing the
    weight loads ahead of the vectors' arithmetic); program 0 writes the sum after it.
    PREFETCH: the next step's weight tile is loaded before this step's vectors."""
    pdl_start(USE_PDL)
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + (tl.minimum(rn, N - 1).to(tl.int64) * stride_wn)[:, None, None]
    j = tl.arange(0, BLOCK_K // CHUNK)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    k_in = j[None, :, :]  # [1, BK / CHUNK, CHUNK]
    same = tl.zeros([BLOCK_N, 1, 1], dtype=tl.int32)  # the vectors in the weight tile's layout
    res_dtype: tl.constexpr = res_out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_K // CHUNK), dtype=tl.float32)
    ss = tl.zeros((BLOCK_N, BLOCK_K // CHUNK), dtype=tl.float32)
    steps = tl.cdiv(K, BLOCK_K)
    w_next = _load_k(w_rows + k_in, k_in, K, EVEN_K)
    for i in range(steps):
        koff = i * BLOCK_K + k_in
        if PREFETCH:
            w = w_next
            k_nx = koff + BLOCK_K
            w_next = tl.load(w_rows + k_nx, mask=(k_nx < K) & (same == 0), other=0.0)
        else:
            w = _load_k(w_rows + koff, koff, K, EVEN_K)
        vo = same + koff
        g = _to_f32(_load_k(g_ptr + vo, koff, K, EVEN_K), PTX)
        h = _to_f32(_add_rows(x_ptr, res_ptr, vo, koff, K, res_dtype, EVEN_K, PTX), PTX)
        acc += tl.sum(_to_f32(w, PTX) * (h * g), axis=2)
        ss += tl.sum(h * h, axis=2)
    rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps)  # [BN], the same in every row
    y = tl.sum(acc, axis=1) * rstd
    if HAS_BIAS:
        y += tl.load(bias_ptr + tl.minimum(rn, N - 1)).to(tl.float32)
    tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=rn < N)
    if pid == 0:  # the new residual: the same rounded sums, once
        for i in range(tl.cdiv(K, BLOCK_K)):
            koff = i * BLOCK_K + k_in
            h = _add_rows(x_ptr, res_ptr, koff, koff, K, res_dtype, EVEN_K, PTX)
            tl.store(res_out_ptr + koff, h, mask=koff < K)


def gemv_add_rms_norm_applies(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                              weight: torch.Tensor) -> bool:
    """Whether ``gemv_add_rms_norm`` takes these: one 16-bit row, everything in one dtype."""
    dtype = x.dtype
    return (x.dim() == 2 and x.shape[0] == 1 and dtype in (torch.bfloat16, torch.float16)
            and residual.shape == x.shape and residual.dtype == dtype
            and norm_weight.dtype == dtype and weight.dtype == dtype
            and weight.dim() == 2 and weight.shape[1] == x.shape[1] and weight.stride(1) == 1)


def gemv_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                      eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      config: NormGemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) @ weight.T (+ bias), x + residual)`` for one row ``[1, K]``
    (``gemv_add_rms_norm_applies``); ``residual`` is not modified."""
    if not gemv_add_rms_norm_applies(x, residual, norm_weight, weight):
        raise ValueError(
            f"gemv_add_rms_norm takes one 16-bit row and a [N, K] row-major weight of its dtype; "
            f"got x {tuple(x.shape)} {x.dtype}, residual {tuple(residual.shape)} "
            f"{residual.dtype}, norm weight {norm_weight.dtype}, weight {tuple(weight.shape)} "
            f"{weight.dtype}; use fused_add_rms_norm and a linear")
    cfg = config or NORM_GEMV_CONFIG
    x, residual = x.contiguous(), residual.contiguous()
    n, k = weight.shape
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    new_res = torch.empty_like(residual)
    extra = {} if cfg.maxnreg is None or _interpreted(x) else {"maxnreg": cfg.maxnreg}
    _gemv_add_rms_norm_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, residual, norm_weight.contiguous(), weight, bias if bias is not None else x, out,
        new_res, n, k, weight.stride(0), eps, HAS_BIAS=bias is not None,
        EVEN_K=k % cfg.block_k == 0, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        CHUNK=cfg.chunk, PREFETCH=cfg.prefetch, PTX=_ptx(x), num_warps=cfg.num_warps,
        num_stages=1, **extra, **pdl_args(x.device))
    return out, new_res
