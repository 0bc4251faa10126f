"""Fused MoE on Triton: route, align tokens by expert, two grouped GEMMs with SiLU-and-mul.

The grouped GEMM (``_expert_gemm_kernel``) runs one program per (block of ``BLOCK_M``
expert-sorted rows, block of ``BLOCK_N`` output columns); every row of a block belongs to the
same expert (``align.py``), so the block multiplies by that expert's weight only. Rows are
gathered by index, so the activations are never permuted in memory::

    logits [T, E] --route (routing.py, 1 launch)--> weights, ids [T, k]
    ids --align (align.py, 2 launches)--> sorted_ids, block_expert, num_padded
    hidden [T, H] --gather rows p // k--> GEMM 1 (w13[e]) --> C1 [T*k, 2I] (row p = pair p)
    silu(C1[:, :I]) * C1[:, I:] --> A2 [T*k, I] --> GEMM 2 (w2[e], x routing weight) --> C2 [T*k, H]
    out[t] = sum over slots of C2[t * k + slot]   (_sum_topk_kernel, float32, 1 launch)

At decode sizes (``BLOCK_M`` <= 32) SiLU-and-mul runs in GEMM 1's epilogue (each program holds
the gate and the up columns of its block: C1 is never written), so a layer is 6 launches; the
grids have only the blocks that can hold pairs (``align.py``: a host bound from T*k, no sync)
and, inside a CUDA graph on sm90+, the kernels chain by programmatic dependent launch
(``kernels/pdl.py``). The routing weights multiply GEMM 2's rows in its epilogue; the k rows
of a token are summed by a small kernel rather than by atomics (deterministic, and at 1 token
the same one launch as a zeroed buffer's cast would be).

fp8 experts (``float8_e4m3fn`` weights with per-output-channel float32 scales ``[E, N]``) are
widened in the tile and the accumulator is scaled per column (W8A16). Block-wise fp8 experts
(``block_shape (bn, bk)``, scales ``[E, N/bn, K/bk]``: Qwen3-MoE-FP8, DeepSeek-V3) are
dequantized tile by tile instead: each K step lies in one block column (``BLOCK_K`` <= bk), its
weight tile times the block scales of its rows, rounded to the activations' dtype as the
reference's ``dequantize_experts`` rounds it, then the same dot (W8A16); the decode path
(``decode.py``) does not take block scales, so they always run the grouped GEMMs.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm import envs
from tessellm.kernels.activation import _silu_and_mul_kernel
from tessellm.kernels.moe.align import align_by_expert_triton
from tessellm.kernels.moe.decode import (decode_max_tokens, decode_route, fused_moe_decode,
                                         fused_moe_decode_routed)
from tessellm.kernels.moe.decode_int4 import fused_moe_int4_decode
from tessellm.kernels.moe.int4_dequant import (dequantize_int4_experts, expert_chunk,
                                               moe_int4_dequant_applies)
from tessellm.kernels.moe.int4_tc_moe import (moe_int4_tc_applies, moe_int4_tc_block_m,
                                              moe_int4_tc_gemm)
from tessellm.kernels.moe.routing import route_triton
from tessellm.kernels.pdl import pdl_args, pdl_start


@triton.jit
def _expert_gemm_kernel(a_ptr, b_ptr, c_ptr, scale_ptr, weight_ptr, bias_ptr, sorted_ids_ptr,
                        block_expert_ptr, num_padded_ptr, N, K, num_pairs, stride_am, stride_be,
                        stride_bn, stride_cm, stride_se, stride_bias, alpha, limit,
                        A_ROW_DIV: tl.constexpr, HAS_SCALE: tl.constexpr,
                        MUL_WEIGHT: tl.constexpr, SILU_MUL: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
                        DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr,
                        HAS_BIAS: tl.constexpr = False, ACT: tl.constexpr = 0,
                        GROUP_N: tl.constexpr = 0, GROUP_K: tl.constexpr = 0,
                        SCALE_ROW: tl.constexpr = 0, zeros_ptr=None, INT4: tl.constexpr = False,
                        HAS_ZEROS: tl.constexpr = False, perm_ptr=None,
                        HAS_PERM: tl.constexpr = False):
    """C[p, n] = (sum_k A[p // A_ROW_DIV, k] * B[e, n, k] (* scale[e, n]) (+ bias[e, n]))
    (* weight[p]); with SILU_MUL, C[p, n] = act(that of column n, that of column n + N) (gate
    and up halves): ACT 0 ``silu(g) * u``, 1 gpt-oss's clamped SwiGLU (``alpha``, ``limit``;
    ``reference.moe.ExpertActivation``). HAS_BIAS, ACT: constexpr, no code when off.
    GROUP_K > 0: block scales ``scale[e, n // GROUP_N, k // GROUP_K]`` (``SCALE_ROW``: elements
    between two block rows) multiply each weight tile before its dot. INT4: ``B`` holds int4
    codes 8 per int32 along k (``B[e, n, k // 8]``), dequantized in the tile as ``(q -
    zero[e, n, k // GROUP_K]) * scale[e, n, k // GROUP_K]`` (GROUP_N 1; zero 8 without
    HAS_ZEROS; each K step inside one group). HAS_PERM (GPTQ act order): A's columns are
    gathered through ``perm[e, k]`` (``[E, K]`` int32): C = A[:, perm[e]] @ B[e]^T."""
    pdl_start(USE_PDL)
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_row = a_ptr + (pairs // A_ROW_DIV).to(tl.int64)[:, None] * stride_am
    b_col = b_ptr + expert * stride_be + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # unused (and dropped) unless SILU_MUL
    dt = c_ptr.dtype.element_ty
    if GROUP_K > 0:  # the block row of each column (and of its up column), clamped past N
        s_off = expert * stride_se + (tl.minimum(rn, N - 1) // GROUP_N) * SCALE_ROW
        s_up_off = expert * stride_se + ((tl.minimum(rn, N - 1) + N) // GROUP_N) * SCALE_ROW
        s_col, s_up = scale_ptr + s_off, scale_ptr + s_up_off
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if HAS_PERM:
            cols = tl.load(perm_ptr + expert * K + rk, mask=rk < K, other=0)
            a = tl.load(a_row + cols[None, :], mask=row_ok[:, None] & (rk[None, :] < K),
                        other=0.0)
        else:
            a = tl.load(a_row + rk[None, :], mask=row_ok[:, None] & (rk[None, :] < K),
                        other=0.0)
        b_mask = (rk[:, None] < K) & (rn[None, :] < N)
        if INT4:  # each packed word loaded once ([BLOCK_K / 8, BLOCK_N]), 8 codes unpacked
            rkw = tl.max_contiguous(tl.multiple_of(k0 // 8 + tl.arange(0, BLOCK_K // 8),
                                                   BLOCK_K // 8), BLOCK_K // 8)
            w_mask = (rkw[:, None] < K // 8) & (rn[None, :] < N)
            b = _int4_tile(tl.load(b_col + rkw[:, None], mask=w_mask, other=0),
                           s_col + k0 // GROUP_K, zeros_ptr + s_off + k0 // GROUP_K,
                           HAS_ZEROS, dt, BLOCK_K, BLOCK_N)
        else:
            b = tl.load(b_col + rk[:, None], mask=b_mask, other=0.0)
        if GROUP_K > 0 and not INT4:
            b = (b.to(tl.float32) * tl.load(s_col + k0 // GROUP_K)[None, :]).to(dt)
        if DOT_FP32:  # the interpreter's bf16 dot is wrong: widen the tiles there
            a = a.to(tl.float32)
        acc += tl.dot(a, b.to(a.dtype), input_precision=DOT_PREC)
        if SILU_MUL:
            if INT4:
                b_up = _int4_tile(tl.load(b_col + N * stride_bn + rkw[:, None], mask=w_mask,
                                          other=0), s_up + k0 // GROUP_K,
                                  zeros_ptr + s_up_off + k0 // GROUP_K, HAS_ZEROS, dt, BLOCK_K,
                                  BLOCK_N)
            else:
                b_up = tl.load(b_col + N * stride_bn + rk[:, None], mask=b_mask, other=0.0)
            if GROUP_K > 0 and not INT4:
                b_up = (b_up.to(tl.float32) * tl.load(s_up + k0 // GROUP_K)[None, :]).to(dt)
            acc_up += tl.dot(a, b_up.to(a.dtype), input_precision=DOT_PREC)
    if HAS_SCALE and GROUP_K == 0:
        acc *= tl.load(scale_ptr + expert * stride_se + rn, mask=rn < N, other=0.0)[None, :]
        if SILU_MUL:
            acc_up *= tl.load(scale_ptr + expert * stride_se + N + rn, mask=rn < N,
                              other=0.0)[None, :]
    if HAS_BIAS:
        b_row = bias_ptr + expert * stride_bias
        acc += tl.load(b_row + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if SILU_MUL:
            acc_up += tl.load(b_row + N + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if SILU_MUL and ACT == 1:  # clamped SwiGLU at the reference's rounding points (each op
        # of ``ExpertActivation`` in C's dtype: gate * alpha, sigmoid, gate * sigmoid, up + 1)
        g = tl.minimum(acc.to(dt).to(tl.float32), limit)
        u = tl.minimum(tl.maximum(acc_up.to(dt).to(tl.float32), -limit), limit)
        ga = (g * alpha).to(dt).to(tl.float32)
        sg = (1.0 / (1.0 + tl.exp(-ga))).to(dt).to(tl.float32)
        glu = (g * sg).to(dt).to(tl.float32)
        acc = (u + 1.0).to(dt).to(tl.float32) * glu
    elif SILU_MUL:  # the reference's rounding points: gate/up, SiLU and product each in C's dtype
        g = acc.to(dt).to(tl.float32)
        acc = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * acc_up.to(dt).to(tl.float32)
    if MUL_WEIGHT:
        acc *= tl.load(weight_ptr + pairs, mask=row_ok, other=0.0)[:, None]
    c = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c, acc.to(dt), mask=row_ok[:, None] & (rn[None, :] < N))


@triton.jit
def _int4_tile(words, s_ptrs, z_ptrs, HAS_ZEROS: tl.constexpr, dt: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[BLOCK_K / 8, BLOCK_N]`` packed int32 words (8 inputs each, low nibble first) -> the
    ``[BLOCK_K, BLOCK_N]`` weights in ``dt``: ``(q - zero) * scale`` in float32 (the
    reference's ``dequantize_int4``), then rounded. The tile lies in one group: a scale and a
    zero a column (``s_ptrs`` / ``z_ptrs`` ``[BLOCK_N]``)."""
    nib = (tl.arange(0, 8) * 4)[None, :, None]
    q = ((words[:, None, :] >> nib) & 0xF).to(tl.float32)  # [BLOCK_K / 8, 8, BLOCK_N]
    if HAS_ZEROS:
        q = q - tl.load(z_ptrs).to(tl.float32)[None, None, :]
    else:
        q = q - 8.0
    w = (q * tl.load(s_ptrs).to(tl.float32)[None, None, :]).to(dt)
    return tl.reshape(w, (BLOCK_K, BLOCK_N))  # row 8 w + j: input j of word w


@triton.jit
def _sum_topk_kernel(c_ptr, out_ptr, H, K: tl.constexpr, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr):
    """out[t] = sum over the K slots of c[t * K + slot], in float32 (the weighted rows)."""
    pdl_start(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(c_ptr + (t * K + j) * H + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _tiles(pairs: int, num_experts: int, device: Optional[torch.device] = None,
           itemsize: int = 2) -> dict:
    """Tile sizes by the mean rows per expert: decode-sized groups take short blocks. H200 sweep
    (``benchmarks/kernels/gpuperf_probe.py``, Qwen3-30B-A3B layer, CUDA graph, L2 flushed,
    ``benchmarks/results/h200-2026-12-04-gpuperf``): 4 rows per expert (64 tokens) 397 us with
    16x128x128 against 418 with 32x64x64; 256 rows (4096 tokens) 1,061 against 1,255 with
    128x256x64 / 8 warps / 4 stages (192 KB of shared memory in 16-bit: sm90 NVIDIA only;
    float32 operands would need 288 KB, so they keep the default tile)."""
    if envs.triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    if pairs <= 2 * num_experts:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    if pairs <= 8 * num_experts:
        return dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=2)
    if pairs <= 32 * num_experts:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
    if device is not None and itemsize <= 2 and _big_smem(device):
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)


def _big_smem(device: torch.device) -> bool:
    """NVIDIA sm90+ (228 KB of shared memory a multiprocessor): the large prefill tiles fit."""
    return (device.type == "cuda" and torch.version.hip is None
            and _capability(device.index or 0)[0] >= 9)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _silu_and_mul(c1: torch.Tensor, inter: int) -> torch.Tensor:
    """``silu(c1[:, :inter]) * c1[:, inter:]`` in one Triton launch (the SiLU rounded to c1's
    dtype before the product, as torch's two ops do): the unfused path of the large tiles."""
    out = torch.empty(c1.shape[0], inter, dtype=c1.dtype, device=c1.device)
    if c1.shape[0]:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(c1.shape[0], triton.cdiv(inter, block))](
            c1, out, inter, c1.stride(0), out.stride(0), BLOCK=block, num_warps=4,
            **pdl_args(c1.device))
    return out


def _expert_gemm(a, w, scale, weights, sorted_ids, block_expert, num_padded, out, row_div, tiles,
                 silu_mul: bool = False, bias=None, activation=None, block_shape=None,
                 int4: bool = False, zeros=None, perm=None):
    """One grouped GEMM over the ``sorted_ids.numel() // BLOCK_M`` blocks (``align.py``: the
    host's bound on the blocks that can hold pairs). ``silu_mul``: ``w``'s rows are [gate | up]
    and ``out`` gets the activation of the two halves (``out``'s width: half of ``w``'s rows):
    SiLU-and-mul, or ``activation``'s (an ``ExpertActivation``). ``bias`` ``[E, rows of w]``:
    added to each product (before the activation and the routing weight). ``block_shape``:
    ``scale`` holds block scales ``[E, Nb, Kb]`` (``tiles``' BLOCK_K must divide bk). ``int4``:
    ``w`` int4 codes ``[E, N, K/8]`` with group scales ``[E, N, G]`` and uint8 ``zeros`` of that
    shape or None (8); each K step stays inside one group; ``perm`` ``[E, K]`` int32: ``a``'s
    columns in that order per expert (GPTQ act order)."""
    n, k = out.shape[1], w.shape[2] * (8 if int4 else 1)
    if (int4 and bias is None and activation is None and block_shape is None
            and moe_int4_tc_applies(k, k // scale.shape[2])):
        # K and group multiples of 128: the tensor-core kernel (codes exact in the dot)
        moe_int4_tc_gemm(a, w, scale, zeros, weights, sorted_ids, block_expert, num_padded, out,
                         row_div, tiles["BLOCK_M"], silu_mul, perm)
        return
    clamped = activation is not None and activation.kind == "swiglu_oai"
    grid = (sorted_ids.numel() // tiles["BLOCK_M"], triton.cdiv(n, tiles["BLOCK_N"]))
    variant = {}
    if bias is not None or clamped:  # constexprs off by default: the kernels compile as before
        variant = dict(HAS_BIAS=bias is not None, ACT=1 if clamped else 0)
    if block_shape is not None:
        variant.update(GROUP_N=block_shape[0], GROUP_K=block_shape[1], SCALE_ROW=scale.stride(1))
    if int4:
        group = k // scale.shape[2]
        tiles = dict(tiles, BLOCK_K=_int4_block_k(tiles["BLOCK_K"], group))
        variant.update(GROUP_N=1, GROUP_K=group, SCALE_ROW=scale.stride(1), INT4=True,
                       HAS_ZEROS=zeros is not None, zeros_ptr=zeros if zeros is not None else scale)
    if perm is not None:
        variant.update(HAS_PERM=True, perm_ptr=perm)
    _expert_gemm_kernel[grid](
        a, w, out, scale if scale is not None else w, weights if weights is not None else out,
        bias if bias is not None else w, sorted_ids, block_expert, num_padded, n, k,
        out.shape[0], a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        scale.stride(0) if scale is not None else 0, bias.stride(0) if bias is not None else 0,
        activation.alpha if clamped else 0.0, activation.limit if clamped else 0.0,
        A_ROW_DIV=row_div, HAS_SCALE=scale is not None, MUL_WEIGHT=weights is not None,
        SILU_MUL=silu_mul, DOT_PREC="ieee" if a.dtype == torch.float32 else "tf32",
        DOT_FP32=a.dtype == torch.bfloat16 and a.device.type == "cpu", **variant, **tiles,
        **pdl_args(a.device))


def _int4_block_k(block_k: int, group: int) -> int:
    """The largest power of two <= ``block_k`` dividing ``group`` (a K step in one group)."""
    while group % block_k:
        block_k //= 2
    if block_k < 16:
        raise ValueError(f"int4 experts in groups of {group} inputs cannot run the Triton fused "
                         "MoE (a K step of 16 would span two groups); use the reference op.")
    return block_k


def _int4_groups_of_words(w13, w13_scale, w2, w2_scale) -> bool:
    """Whether each packed word of the int4 experts lies in one group (g a multiple of 8)."""
    return all((w.shape[2] * 8 // s.shape[2]) % 8 == 0 for w, s in ((w13, w13_scale),
                                                                      (w2, w2_scale)))


def _sum_topk(c2: torch.Tensor, t: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """``c2 [T*k, H]`` (weighted rows) -> ``[T, H]``: the k slots of each token summed in
    float32, written in ``dtype``, one launch."""
    h = c2.shape[1]
    out = torch.empty(t, h, dtype=dtype, device=c2.device)
    if t:
        block = min(1024, triton.next_power_of_2(h))
        _sum_topk_kernel[(t, triton.cdiv(h, block))](c2, out, h, K=k, BLOCK=block, num_warps=4,
                                                     **pdl_args(c2.device))
    return out


def fused_moe_triton(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     w13: torch.Tensor, w2: torch.Tensor, w13_scale: Optional[torch.Tensor] = None,
                     w2_scale: Optional[torch.Tensor] = None,
                     tiles: Optional[dict] = None, *, activation=None,
                     w13_bias: Optional[torch.Tensor] = None,
                     w2_bias: Optional[torch.Tensor] = None, block_shape=None,
                     expert_map: Optional[torch.Tensor] = None, int4: bool = False,
                     w13_zeros: Optional[torch.Tensor] = None,
                     w2_zeros: Optional[torch.Tensor] = None,
                     w13_perm: Optional[torch.Tensor] = None,
                     bnb4_code: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``hidden [T, H]``, routing ``topk_weights`` / ``topk_ids`` ``[T, k]``, experts ``w13
    [E, 2I, H]`` and ``w2 [E, H, I]`` (fp8 with ``*_scale [E, N]``, or hidden's dtype);
    returns ``[T, H]`` in hidden's dtype. ``tiles``: the grouped GEMMs' launch parameters
    instead of ``_tiles``' (benchmarks); the key ``SILU_MUL`` (default: on for ``BLOCK_M`` <=
    32) computes SiLU-and-mul in the first GEMM's epilogue, with ``BLOCK_N`` columns of the
    gate and of the up half each (so ``BLOCK_N / 2`` of the unfused tile's). Up to
    ``decode.DECODE_MAX_TOKENS`` tokens (and no ``tiles``) the two-launch decode path runs
    instead (``decode.py``: no alignment, no sum kernel), unless a variant is asked for:
    ``activation`` (an ``ExpertActivation`` other than SiLU: gpt-oss's clamped SwiGLU, or
    Nemotron-H's ungated "relu2", ``w13 [E, I, H]``, whose activation runs in torch between
    the GEMMs),
    ``w13_bias [E, 2I]`` / ``w2_bias [E, H]`` added after each product (``reference/moe.py``);
    those run the grouped GEMMs at every size, as block-wise fp8 experts (``block_shape``, the
    scales ``[E, N/bn, K/bk]``) do.

    ``expert_map`` (expert parallelism, ``reference/moe.py``: global id -> local id or -1;
    ``topk_ids`` global, ``w13`` / ``w2`` the local experts): the grouped GEMMs give the pairs of
    other ranks' experts no row (they align as id E, ``align.py``) and their slots of the sum
    stay zero; the decode path sends them to local expert 0 with weight 0 instead (one more
    read of an expert it likely reads anyway, no extra launch).

    ``int4`` (AWQ / GPTQ experts, ``reference/moe.py``): ``w13`` / ``w2`` int32 codes ``[E, N,
    K/8]``, ``*_scale [E, N, K/g]`` group scales, ``*_zeros`` uint8 zero codes or None (8);
    the grouped GEMMs dequantize each weight tile (W4A16); up to ``DECODE_MAX_TOKENS`` tokens
    (no ``tiles``, no other variant) the int4 decode kernels run instead (``decode_int4.py``),
    and from ``int4_dequant.MOE_INT4_DEQUANT_TOKENS`` tokens (no ``tiles``) the experts are
    dequantized a chunk at a time into a transient workspace for the 16-bit grouped GEMMs
    (``_fused_moe_dequant``).
    ``w13_perm`` ``[E, H]`` int32 (GPTQ act order, ``reference/moe.py``): each expert's first
    GEMM gathers the hidden columns in its order.

    ``bnb4_code`` (bitsandbytes 4-bit experts, ``reference/moe.py``: uint8 codes ``[E, N,
    K/2]``, ``*_scale`` the float32 block absmaxes ``[E, N, K/bs]``): ``bnb4_moe.py``."""
    if bnb4_code is not None:
        from tessellm.kernels.moe.bnb4_moe import fused_moe_bnb4

        return fused_moe_bnb4(hidden, topk_weights, topk_ids, w13, w2, w13_scale, w2_scale,
                              bnb4_code, tiles, activation=activation, w13_bias=w13_bias,
                              w2_bias=w2_bias, expert_map=expert_map,
                              others=dict(block_shape=block_shape, int4=int4,
                                          w13_zeros=w13_zeros, w2_zeros=w2_zeros,
                                          w13_perm=w13_perm))
    t, k = topk_ids.shape
    if activation is not None and activation.kind == "silu":
        activation = None
    variant = (activation is not None or w13_bias is not None or w2_bias is not None
               or block_shape is not None or int4)
    num_experts = w13.shape[0]
    if expert_map is not None:
        local = expert_map[topk_ids.long()]
        held = local >= 0
    # int4 experts take their own decode kernels (``decode_int4.py``) where nothing else
    # of the variant is asked for and every packed word lies in one group
    plain = (activation is None and w13_bias is None and w2_bias is None
             and block_shape is None)
    int4_decode = int4 and plain and _int4_groups_of_words(w13, w13_scale, w2, w2_scale)
    if tiles is None and 0 < t <= decode_max_tokens() and (not variant or int4_decode):
        if expert_map is not None:
            topk_weights = torch.where(held, topk_weights.float(), 0.0)
            topk_ids = torch.where(held, local, 0)
        if int4_decode:
            return fused_moe_int4_decode(hidden, topk_weights, topk_ids, w13, w2, w13_scale,
                                         w2_scale, w13_zeros, w2_zeros, w13_perm=w13_perm)
        return fused_moe_decode(hidden, topk_weights, topk_ids, w13, w2, w13_scale, w2_scale)
    if expert_map is not None:
        topk_ids = torch.where(held, local, num_experts).to(torch.int32)
    if int4 and tiles is None and moe_int4_dequant_applies(t, hidden.device):
        # many tokens: the experts dequantized (a chunk at a time) and the 16-bit GEMMs
        def dequant13(lo, hi, hit):
            return dequantize_int4_experts(w13, w13_scale, w13_zeros, hidden.dtype, lo, hi, hit)

        def dequant2(lo, hi, hit):
            return dequantize_int4_experts(w2, w2_scale, w2_zeros, hidden.dtype, lo, hi, hit)

        return _fused_moe_dequant(hidden, topk_weights, topk_ids, w13, w2, 8, dequant13,
                                  dequant2, w13_perm, activation, w13_bias, w2_bias,
                                  expert_map is not None,
                                  num_experts if expert_map is None else expert_map.shape[0])
    tc = tiles is None and int4 and plain and _int4_tc_both(w13, w13_scale, w2, w2_scale)
    tiles = _grouped_tiles(tiles, t * k, num_experts if expert_map is None else expert_map.shape[0],
                           hidden, int4, tc)
    return _fused_moe_grouped(hidden, topk_weights, topk_ids, w13, w2, w13_scale, w2_scale,
                              tiles, activation, w13_bias, w2_bias, block_shape, int4, w13_zeros,
                              w2_zeros, w13_perm, expert_map is not None)


def _grouped_tiles(tiles: Optional[dict], pairs: int, global_experts: int,
                   hidden: torch.Tensor, int4: bool, tc: bool) -> dict:
    """The grouped GEMMs' launch parameters (a copy): ``tiles`` where given; else by the pairs
    per expert, over the global experts with expert parallelism (``pairs`` is every pair of
    the step's tokens; this rank's experts get their share of them, alike under even routing,
    known without a host sync; over the local experts the rule read ``ep`` times the rows an
    expert gets): where both int4 GEMMs take the tensor-core kernel (``tc``) its own alignment
    block, SiLU fused; else ``_tiles``' (int4: not the large 16-bit prefill tile, sized as a
    float32 operand's)."""
    if tiles is not None:
        return dict(tiles)
    if tc:
        return dict(BLOCK_M=moe_int4_tc_block_m(pairs, global_experts), BLOCK_N=64, BLOCK_K=64,
                    SILU_MUL=True)
    return _tiles(pairs, global_experts, hidden.device, 4 if int4 else hidden.element_size())


def _fused_moe_grouped(hidden, topk_weights, topk_ids, w13, w2, w13_scale, w2_scale,
                       tiles: dict, activation, w13_bias, w2_bias, block_shape, int4: bool,
                       w13_zeros, w2_zeros, w13_perm, zero_others: bool) -> torch.Tensor:
    """``fused_moe_triton``'s grouped GEMMs at ``tiles``: the pairs aligned by expert, GEMM 1
    (SiLU-and-mul in its epilogue where fused), the activation, GEMM 2 weighted by
    ``topk_weights``, the sum over each token's k pairs. ``topk_ids`` local, other ranks'
    pairs as id E (``zero_others``: their slots of GEMM 2's output start as zeros)."""
    t, k = topk_ids.shape
    num_experts, inter = w13.shape[0], w2.shape[2] * (8 if int4 else 1)
    fuse = tiles.pop("SILU_MUL", tiles["BLOCK_M"] <= 32)
    if block_shape is not None:  # a K step must lie inside one block column
        tiles["BLOCK_K"] = min(tiles["BLOCK_K"], block_shape[1])
    blocks = {"block_shape": block_shape} if block_shape is not None else {}
    z13 = z2 = {}
    if int4:
        z13 = dict(int4=True, zeros=None if w13_zeros is None else w13_zeros.contiguous(),
                   perm=None if w13_perm is None else w13_perm.to(torch.int32).contiguous())
        z2 = dict(int4=True, zeros=None if w2_zeros is None else w2_zeros.contiguous())
        w13_scale, w2_scale = w13_scale.contiguous(), w2_scale.contiguous()
    sorted_ids, block_expert, num_padded = align_by_expert_triton(topk_ids, num_experts,
                                                                  tiles["BLOCK_M"])
    hidden = hidden.contiguous()
    dev, dtype = hidden.device, hidden.dtype
    align = (sorted_ids, block_expert, num_padded)
    gated = activation is None or activation.gated
    if fuse and gated:
        act = torch.empty(t * k, inter, dtype=dtype, device=dev)
        tiles1 = dict(tiles, BLOCK_N=max(16, tiles["BLOCK_N"] // 2))
        _expert_gemm(hidden, w13, w13_scale, None, *align, act, k, tiles1, silu_mul=True,
                     bias=w13_bias, activation=activation, **blocks, **z13)
    else:
        c1 = torch.empty(t * k, w13.shape[1], dtype=dtype, device=dev)  # 2I, or I ungated
        _expert_gemm(hidden, w13, w13_scale, None, *align, c1, k, tiles, bias=w13_bias, **blocks,
                     **z13)
        act = _silu_and_mul(c1, inter) if activation is None else activation(c1)
    # pairs of other ranks' experts (expert_map) are never written: their slots sum as zeros
    c2 = (torch.zeros if zero_others else torch.empty)(t * k, w2.shape[1], dtype=dtype,
                                                       device=dev)
    weights = topk_weights.to(torch.float32).contiguous().view(-1)
    _expert_gemm(act, w2, w2_scale, weights, *align, c2, 1, tiles, bias=w2_bias, **blocks, **z2)
    return _sum_topk(c2, t, k, dtype)


def _int4_tc_both(w13, w13_scale, w2, w2_scale) -> bool:
    """Whether both int4 GEMMs run on the tensor-core kernel (``moe_int4_tc_applies``)."""
    return all(moe_int4_tc_applies(w.shape[2] * 8, w.shape[2] * 8 // s.shape[2])
               for w, s in ((w13, w13_scale), (w2, w2_scale)))


def _fused_moe_dequant(hidden, topk_weights, topk_ids, w13, w2, pack: int, dequant13, dequant2,
                       w13_perm, activation, w13_bias, w2_bias, some_elsewhere: bool,
                       global_experts: int) -> torch.Tensor:
    """``fused_moe_triton``'s product on packed experts (``pack`` inputs an element of ``w13``
    / ``w2``: int4's 8 a word, bnb4's 2 a byte) through the 16-bit tiles: int4 from
    ``int4_dequant.MOE_INT4_DEQUANT_TOKENS`` tokens (``int4_dequant.py``), bnb4 beyond its
    decode kernels (``bnb4_dequant.py``). ``dequant13`` / ``dequant2``: ``(lo, hi, hit) ->``
    experts ``lo:hi`` of that weight in hidden's dtype (those ``hit`` 0 unwritten). For each
    chunk of experts (``expert_chunk``: all of
    them where their 16-bit weights fit ``MOE_INT4_DEQUANT_WORKSPACE_MB``) the chunk's pairs
    aligned (every other pair takes no row), its w13 dequantized into a workspace and GEMM 1;
    then (the activation apart on the 16-bit rule's large tiles) for each chunk its w2
    dequantized and GEMM 2. Each workspace goes back to the allocator after its GEMM; every
    pair's rows are written by its expert's chunk alone and summed once. ``topk_ids`` local
    (``num_experts``: a pair another rank holds, ``some_elsewhere``); the tiles by the pairs
    per global expert (``global_experts``, as ``_grouped_tiles``)."""
    t, k = topk_ids.shape
    num_experts = w13.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    hidden = hidden.contiguous()
    gated = activation is None or activation.gated
    tiles = _tiles(t * k, global_experts, dev, hidden.element_size())
    fuse = tiles.pop("SILU_MUL", tiles["BLOCK_M"] <= 32) and gated
    ids = topk_ids.to(torch.int32)
    hit = torch.zeros(num_experts + 1, dtype=torch.int32, device=dev)  # [E]: pairs held elsewhere
    hit.index_fill_(0, ids.reshape(-1).long(), 1)  # experts no pair routes to stay unwritten
    perm = None if w13_perm is None else w13_perm.to(torch.int32)
    chunk = expert_chunk(num_experts, pack * max(w13[0].numel(), w2[0].numel()),
                         hidden.element_size())
    spans = [(lo, min(num_experts, lo + chunk)) for lo in range(0, num_experts, chunk)]
    part = (lambda x, lo, hi: None if x is None else x[lo:hi])  # noqa: E731
    aligns = []
    out1 = torch.empty(t * k, w2.shape[2] * pack if fuse else w13.shape[1], dtype=dtype,
                       device=dev)
    tiles1 = dict(tiles, BLOCK_N=max(16, tiles["BLOCK_N"] // 2)) if fuse else tiles
    for lo, hi in spans:
        # the chunk's experts as 0 .. hi - lo - 1, every other pair hi - lo (no row)
        ids_c = ids if len(spans) == 1 else torch.where((ids >= lo) & (ids < hi), ids - lo,
                                                        hi - lo)
        aligns.append(align_by_expert_triton(ids_c, hi - lo, tiles["BLOCK_M"]))
        ws = dequant13(lo, hi, hit)
        p13 = None if perm is None else perm[lo:hi].contiguous()
        _expert_gemm(hidden, ws, None, None, *aligns[-1], out1, k, tiles1, silu_mul=fuse,
                     bias=part(w13_bias, lo, hi), activation=activation if fuse else None,
                     perm=p13)
        del ws  # back to the allocator: the next chunk's workspace takes its memory
    if fuse:
        act = out1
    else:
        act = _silu_and_mul(out1, w2.shape[2] * pack) if activation is None else activation(out1)
        del out1
    c2 = (torch.zeros if some_elsewhere else torch.empty)(t * k, w2.shape[1], dtype=dtype,
                                                          device=dev)
    weights = topk_weights.to(torch.float32).contiguous().view(-1)
    for (lo, hi), align in zip(spans, aligns):
        ws = dequant2(lo, hi, hit)
        _expert_gemm(act, ws, None, weights, *align, c2, 1, tiles, bias=part(w2_bias, lo, hi))
        del ws
    return _sum_topk(c2, t, k, dtype)


def topk_routing(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool):
    """``(weights [T, k] float32, ids [T, k] int32)``: the contract's routing in one Triton
    launch (``routing.py``)."""
    return route_triton(router_logits, top_k, scoring, renormalize)


def fused_moe(hidden, router_logits, w13, w2, top_k: int, scoring: str = "softmax",
              renormalize: bool = True, w13_scale=None, w2_scale=None, **variant) -> torch.Tensor:
    """The contract's ``FusedOps.fused_moe``: routing (one launch), then ``fused_moe_triton``;
    up to ``decode.DECODE_MAX_TOKENS`` tokens, with ``decode.DECODE_ROUTE``, the decode path
    with the routing inside its first kernel (two launches in all). ``variant``: the keyword-only
    ``activation``, ``w13_bias``, ``w2_bias``, ``block_shape``, ``expert_map`` of
    ``fused_moe_triton`` (they skip the routing inside the decode kernel)."""
    if variant:
        weights, ids = route_triton(router_logits, top_k, scoring, renormalize)
        return fused_moe_triton(hidden, weights, ids, w13, w2, w13_scale, w2_scale, **variant)
    if 0 < hidden.shape[0] <= decode_max_tokens() and decode_route():
        return fused_moe_decode_routed(hidden, router_logits, w13, w2, top_k, scoring,
                                       renormalize, w13_scale, w2_scale)
    weights, ids = route_triton(router_logits, top_k, scoring, renormalize)
    return fused_moe_triton(hidden, weights, ids, w13, w2, w13_scale, w2_scale)
