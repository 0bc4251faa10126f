"""The large-batch path of AWQ / GPTQ int4 MoE experts: dequantize, then the 16-bit GEMMs.

At a few tokens the int4 experts are bound by their weight bytes (a quarter of bf16's), and the
int4 kernels win (``decode_int4.py`` up to ``decode.DECODE_MAX_TOKENS`` tokens, then the
tensor-core grouped GEMM, ``int4_tc_moe.py``). With many tokens every expert holds a block of
rows and the product is bound by its arithmetic; there the int4 grouped GEMM (8 dots of K = 16
a 128-input block) runs 2.4x bf16's time on an H100 (Qwen3-30B-A3B layer at 2048 tokens: 1,649
us against 697, benchmarks/README.md). So, as the dense int4 path dequantizes for cuBLAS from
``quant_ops.INT4_TC_DEQUANT_MIN_M`` rows, from ``MOE_INT4_DEQUANT_TOKENS`` tokens
``fused_moe._fused_moe_int4_dequant`` writes the experts in the activations' dtype into a
workspace (``dequantize_int4_experts``, one Triton launch a weight) and runs the 16-bit grouped
GEMMs (``fused_moe._expert_gemm``'s tiles for 16-bit weights) on it: the cost is one write of
the 16-bit experts (1.2 GB a Qwen3-30B-A3B layer, ~0.4 ms at the H100's bandwidth) for the
16-bit GEMM's speed.

Memory: the workspace is a transient of the step, never kept: at most
``MOE_INT4_DEQUANT_WORKSPACE_MB`` of experts at a time (the experts are taken in chunks of
equal size: each chunk aligns its own pairs, the others' pairs take no row of it, and every pair
is written by its expert's chunk alone), freed to the caching allocator after its GEMM, so the
next layer reuses the same memory. The engine's memory profile forward runs at the step's
largest token count (``ModelRunner.profile_run``), which takes this path wherever a real step
can, so the KV cache is sized with the workspace's peak. Experts no pair routes to are not
dequantized (their workspace rows are left unwritten; no block reads them). Never inside a
CUDA-graph capture (the workspace would stay in the graph's pool): captured steps keep the int4
kernels.

The dequantized weights equal the reference's (``reference.moe.dequantize_int4``: ``(q - zero)
* scale`` in float32, rounded to the dtype) bit for bit, so this path differs from the
reference op by the GEMMs' summation order only.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm import envs

# From this many tokens the dequantized path: H100, Qwen3-30B-A3B layer, CUDA graph, L2 flushed
# (``bench_moe_int4.py --flush --crossover``, session 27, the (16, 16, 2) dequantization below):
# tensor-core / dequantized 1,283 / 1,307 us at 1536 tokens, 1,630 / 1,403 at 2048, 2,958 / 1,744
# at 4096 (bf16's fused MoE: 674 at 2048, 994 at 4096). TESSELLM_MOE_INT4_DEQUANT_TOKENS sets
# it (0: never).
MOE_INT4_DEQUANT_SUGGESTED = 2048
MOE_INT4_DEQUANT_TOKENS = MOE_INT4_DEQUANT_SUGGESTED
# The most 16-bit expert weights one chunk dequantizes at a time (w13 or w2, one at a time).
MOE_INT4_DEQUANT_WORKSPACE_MB = 512
# The dequantization's program: (weight rows, packed words = 8 inputs each, warps). H100,
# session 27 (``bench_moe_int4.py --crossover``, w13 of 64 Qwen3-30B-A3B experts, L2 flushed):
# (16, 16, 2) 225 us (2,257 GB/s of codes read and bf16 written), (16, 16, 4) 232, 231-319 for
# 4-16 rows and 8-32 words; 509 for the earlier (32, 16, 4), 548-1,016 for larger tiles.
DEQUANT_TILE = (16, 16, 2)


def moe_int4_dequant_tokens() -> int:
    """From this many tokens (``MOE_INT4_DEQUANT_TOKENS`` / TESSELLM_MOE_INT4_DEQUANT_TOKENS)
    the int4 fused MoE takes the dequantized path; 0: never."""
    value = envs.moe_int4_dequant_tokens()
    return MOE_INT4_DEQUANT_TOKENS if value is None else value


def moe_int4_dequant_applies(tokens: int, device: torch.device) -> bool:
    """Whether ``tokens`` tokens take the dequantized path: at or above the threshold (0: off),
    and not while a CUDA graph is being captured."""
    threshold = moe_int4_dequant_tokens()
    if threshold <= 0 or tokens < threshold:
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def expert_chunk(num_experts: int, elements: int, itemsize: int,
                 budget_mb: Optional[float] = None) -> int:
    """Experts a chunk dequantizes, ``elements`` weights an expert (its larger projection):
    all where they fit the budget (``MOE_INT4_DEQUANT_WORKSPACE_MB``), else equal chunks that
    do (at least one expert)."""
    budget = (MOE_INT4_DEQUANT_WORKSPACE_MB if budget_mb is None else budget_mb) * (1 << 20)
    chunks = max(1, -(-num_experts * elements * itemsize // int(budget)))
    return max(1, -(-num_experts // chunks))


@triton.jit
def _dequant_int4_kernel(w_ptr, s_ptr, z_ptr, hit_ptr, out_ptr, lo, N, KW, stride_we,
                         stride_wn, stride_se, stride_sn, stride_oe, stride_on,
                         GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_HIT: tl.constexpr,
                         ONE_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Grid ``(experts of the chunk, N / BLOCK_N, KW / BLOCK_W)``: ``out[e - lo, n, 8 w + i] =
    (nibble i of w[e, n, w] - zero) * scale`` in float32, then rounded to out's dtype. ONE_GROUP:
    the program's ``8 BLOCK_W`` inputs lie in one group (a scale a row); else a scale an input.
    HAS_HIT: ``hit[e]`` 0 skips the expert (no pair routes to it)."""
    e_local = tl.program_id(0)
    e = (lo + e_local).to(tl.int64)
    if HAS_HIT:
        if tl.load(hit_ptr + e) == 0:
            return
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    ok = (rn < N)[:, None] & (rw < KW)[None, :]  # [BLOCK_N, BLOCK_W]
    words = tl.load(w_ptr + e * stride_we + rn.to(tl.int64)[:, None] * stride_wn + rw[None, :],
                    mask=ok, other=0)
    nib = tl.arange(0, 8)
    q = ((words[:, :, None] >> (nib * 4)[None, None, :]) & 0xF).to(tl.float32)  # [BN, BW, 8]
    rk = rw[:, None] * 8 + nib[None, :]  # [BLOCK_W, 8]: input 8 w + i
    s_row = e * stride_se + rn.to(tl.int64) * stride_sn
    if ONE_GROUP:
        g = (tl.program_id(2) * BLOCK_W * 8) // GROUP
        s = tl.load(s_ptr + s_row + g, mask=rn < N, other=0.0).to(tl.float32)[:, None, None]
        if HAS_ZEROS:
            z = tl.load(z_ptr + s_row + g, mask=rn < N, other=0).to(tl.float32)[:, None, None]
        else:
            z = 8.0
    else:
        s_off = s_row[:, None, None] + (rk // GROUP)[None, :, :]
        s = tl.load(s_ptr + s_off, mask=ok[:, :, None], other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + s_off, mask=ok[:, :, None], other=0).to(tl.float32)
        else:
            z = 8.0
    w = ((q - z) * s).to(out_ptr.dtype.element_ty)
    o = (out_ptr + e_local.to(tl.int64) * stride_oe + rn.to(tl.int64)[:, None, None] * stride_on
         + rk[None, :, :])
    tl.store(o, w, mask=ok[:, :, None])


def dequantize_int4_experts(w: torch.Tensor, scale: torch.Tensor, zeros: Optional[torch.Tensor],
                            dtype: torch.dtype, lo: int = 0, hi: Optional[int] = None,
                            hit: Optional[torch.Tensor] = None,
                            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int4 experts ``w [E, N, K/8]`` (group ``scale`` ``[E, N, K/g]``, uint8 ``zeros`` of that
    shape or None: 8) -> experts ``lo:hi`` as ``dtype`` ``[hi - lo, N, K]`` (into ``out``, a
    contiguous buffer of that shape, where given), equal to ``reference.moe.dequantize_int4``'s.
    ``hit`` (int, ``[>= E]``): experts with 0 are left unwritten. One Triton launch."""
    hi = w.shape[0] if hi is None else hi
    n, kw = w.shape[1], w.shape[2]
    k = kw * 8
    group = k // scale.shape[2]
    if out is None:
        out = torch.empty(hi - lo, n, k, dtype=dtype, device=w.device)
    elif out.shape != (hi - lo, n, k) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"dequantize_int4_experts: out must be a contiguous {dtype} "
                         f"[{hi - lo}, {n}, {k}], got {out.dtype} {list(out.shape)}")
    if hi <= lo or n == 0 or kw == 0:
        return out
    interp = w.device.type == "cpu"
    block_n, block_w, warps = (16, 8, 4) if interp else DEQUANT_TILE
    w, scale = w.contiguous(), scale.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    _dequant_int4_kernel[(hi - lo, triton.cdiv(n, block_n), triton.cdiv(kw, block_w))](
        w, scale, zeros if zeros is not None else scale, hit if hit is not None else scale, out,
        lo, n, kw, w.stride(0), w.stride(1), scale.stride(0), scale.stride(1), out.stride(0),
        out.stride(1), GROUP=group, HAS_ZEROS=zeros is not None, HAS_HIT=hit is not None,
        ONE_GROUP=group % (8 * block_w) == 0, BLOCK_N=block_n,
        BLOCK_W=block_w, num_warps=warps)
    return out
