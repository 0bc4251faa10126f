"""The many-token path of bitsandbytes 4-bit MoE experts: dequantize, then the 16-bit GEMMs.

Beyond ``decode_bnb4.bnb4_decode_max_tokens()`` tokens the fused MoE
(``fused_moe._fused_moe_dequant``, the int4 experts' large-batch path) writes the experts in
the activations' dtype into a transient workspace, a chunk of experts at a time
(``int4_dequant.expert_chunk``: at most ``MOE_INT4_DEQUANT_WORKSPACE_MB``), and runs the 16-bit
grouped GEMMs on it; experts no pair routes to are not dequantized (``hit``). One launch a
chunk and weight (``dequantize_bnb4_experts``), where the layer's dense path before it
(``layers/moe_bnb.dense_experts``) ran ~10 torch launches a chunk and kept the routed experts
of both weights dense at once.

The dequantized weights equal the reference's (``reference.moe.dequantize_bnb4_experts``:
``code[q] * absmax`` in float32, rounded to the dtype) bit for bit, so this path differs from
the reference op by the GEMMs' summation order only. Under a CUDA-graph capture the workspace
is allocated in the graph's pool (as the dense path's experts were).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# The dequantization's program: (weight rows, blocks of bs inputs, warps); not swept yet
# (int4_dequant's DEQUANT_TILE moves 16 rows x 128 inputs a program).
DEQUANT_TILE = (16, 2, 4)


@triton.jit
def _dequant_bnb4_kernel(w_ptr, a_ptr, code_ptr, hit_ptr, out_ptr, lo, N, KB, stride_we,
                         stride_wn, stride_ae, stride_an, stride_oe, stride_on,
                         BS: tl.constexpr, HAS_HIT: tl.constexpr, BLOCK_N: tl.constexpr,
                         NB: tl.constexpr):
    """Grid ``(experts of the chunk, N / BLOCK_N, KB / NB)``: ``out[e - lo, n, b bs + 2 j + h]
    = code[nibble h of byte j of block b] * absmax[e, n, b]`` (h 0: the high nibble) in float32,
    then rounded to out's dtype. HAS_HIT: ``hit[e]`` 0 skips the expert (no pair routes to
    it)."""
    e_local = tl.program_id(0)
    e = (lo + e_local).to(tl.int64)
    if HAS_HIT:
        if tl.load(hit_ptr + e) == 0:
            return
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rb = tl.program_id(2) * NB + tl.arange(0, NB)
    ok2 = (rn < N)[:, None] & (rb < KB)[None, :]  # [BLOCK_N, NB]
    ok = ok2[:, :, None]
    kb = rb[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]  # [NB, BS/2]: byte offsets
    byte = tl.load(w_ptr + e * stride_we + rn[:, None, None] * stride_wn + kb[None, :, :],
                   mask=ok, other=0).to(tl.int32)
    half = tl.arange(0, 2)[None, None, None, :]
    q = (byte[:, :, :, None] >> (4 - 4 * half)) & 15  # [BLOCK_N, NB, BS/2, 2]
    absmax = tl.load(a_ptr + e * stride_ae + rn[:, None] * stride_an + rb[None, :],
                     mask=ok2, other=0.0)  # [BLOCK_N, NB]
    w = (tl.load(code_ptr + q) * absmax[:, :, None, None]).to(out_ptr.dtype.element_ty)
    o = (out_ptr + e_local.to(tl.int64) * stride_oe + rn[:, None, None, None] * stride_on
         + 2 * kb[None, :, :, None] + half)
    tl.store(o, w, mask=ok[:, :, :, None])


def dequantize_bnb4_experts(w: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                            dtype: torch.dtype, lo: int = 0, hi: Optional[int] = None,
                            hit: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bnb4 experts ``w [E, N, K/2]`` (float32 ``absmax [E, N, K/bs]``, the 16-entry ``code``)
    -> experts ``lo:hi`` as ``dtype`` ``[hi - lo, N, K]``, equal to
    ``reference.moe.dequantize_bnb4_experts``'s. ``hit`` (int, ``[>= E]``): experts with 0 are
    left unwritten. One Triton launch."""
    hi = w.shape[0] if hi is None else hi
    n, k = w.shape[1], w.shape[2] * 2
    out = torch.empty(hi - lo, n, k, dtype=dtype, device=w.device)
    if hi <= lo or n == 0 or k == 0:
        return out
    kb, bs = absmax.shape[2], k // absmax.shape[2]
    block_n, nb, warps = (16, 2, 4) if w.device.type == "cpu" else DEQUANT_TILE
    w, absmax, table = w.contiguous(), absmax.float().contiguous(), code.float().contiguous()
    _dequant_bnb4_kernel[(hi - lo, triton.cdiv(n, block_n), triton.cdiv(kb, nb))](
        w, absmax, table, hit if hit is not None else absmax, out, lo, n, kb, w.stride(0),
        w.stride(1), absmax.stride(0), absmax.stride(1), out.stride(0), out.stride(1), BS=bs,
        HAS_HIT=hit is not None, BLOCK_N=block_n, NB=nb, num_warps=warps)
    return out
