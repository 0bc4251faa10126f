"""The KV cache write: one program per token writes its k and v at ``slot_mapping`` (-1:
skipped); ``rotary_and_cache`` first NeoX-rotates q in place and k on its way to the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.attention.common import _fp8_max, _is_fp8, _p2
from tessellm.kernels.pdl import pdl_args, pdl_launch, pdl_start, pdl_wait
from tessellm.kernels.rotary import rope_halves, rotate_heads


@triton.jit
def _reshape_and_cache_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                              stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_kcb, stride_kct, stride_kch,
                              stride_vcb, stride_vct, stride_vch,
                              inv_k_scale, inv_v_scale,
                              NUM_KV_HEADS: tl.constexpr, KVH_P2: tl.constexpr,
                              HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                              FP8: tl.constexpr, FP8_MAX: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, KVH_P2)[:, None]
    d = tl.arange(0, HEAD_SIZE)[None, :]
    mask = h < NUM_KV_HEADS
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if FP8:  # scale, then saturate: e4m3 has no infinity
        k = tl.minimum(tl.maximum(k.to(tl.float32) * inv_k_scale, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32) * inv_v_scale, -FP8_MAX), FP8_MAX)
    tl.store(kc_ptr + blk * stride_kcb + off * stride_kct + h * stride_kch + d,
             k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + blk * stride_vcb + off * stride_vct + h * stride_vch + d,
             v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_and_cache_kernel(pos_ptr, cos_sin_ptr, q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                             stride_cs, stride_qt, stride_qh, stride_kt, stride_kh,
                             stride_vt, stride_vh, stride_kcb, stride_kct, stride_kch,
                             stride_vcb, stride_vct, stride_vch, inv_k_scale, inv_v_scale,
                             NUM_HEADS: tl.constexpr, HEADS_P2: tl.constexpr,
                             NUM_KV_HEADS: tl.constexpr, KVH_P2: tl.constexpr,
                             HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             FP8: tl.constexpr, FP8_MAX: tl.constexpr, USE_PDL: tl.constexpr):
    """One token per program: NeoX-rotates its q heads in place (slot -1 too), then writes its
    rotated k and its v to the caches at its slot (none for slot -1). ``k`` itself is read only.
    Rounds like ``TritonOps.rotary_embedding`` followed by ``_reshape_and_cache_kernel``."""
    pdl_launch(USE_PDL)  # positions, cos/sin and slots are the step's inputs (``pdl.py``)
    HALF: tl.constexpr = HEAD_SIZE // 2
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + j)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + j)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    pdl_wait(USE_PDL)
    rotate_heads(q_ptr, t, stride_qt, stride_qh, cos, sin, NUM_HEADS, HEADS_P2, HALF, HALF)

    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, KVH_P2)[:, None]
    mask = h < tl.where(slot >= 0, NUM_KV_HEADS, 0)  # slot -1: no head is written
    k_ptrs = k_ptr + t * stride_kt + h * stride_kh + j[None, :]
    k1, k2 = rope_halves(tl.load(k_ptrs, mask=mask, other=0.0),
                         tl.load(k_ptrs + HALF, mask=mask, other=0.0),
                         cos[None, :], sin[None, :], k_ptr.dtype.element_ty)
    if FP8:  # scale, then saturate: e4m3 has no infinity
        k1 = tl.minimum(tl.maximum(k1.to(tl.float32) * inv_k_scale, -FP8_MAX), FP8_MAX)
        k2 = tl.minimum(tl.maximum(k2.to(tl.float32) * inv_k_scale, -FP8_MAX), FP8_MAX)
    kc_ptrs = kc_ptr + blk * stride_kcb + off * stride_kct + h * stride_kch + j[None, :]
    tl.store(kc_ptrs, k1.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(kc_ptrs + HALF, k2.to(kc_ptr.dtype.element_ty), mask=mask)

    d = tl.arange(0, HEAD_SIZE)[None, :]
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if FP8:
        v = tl.minimum(tl.maximum(v.to(tl.float32) * inv_v_scale, -FP8_MAX), FP8_MAX)
    tl.store(vc_ptr + blk * stride_vcb + off * stride_vct + h * stride_vch + d,
             v.to(vc_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> None:
    """Write ``k``/``v`` ``[T, KVH, D]`` into the caches at ``slot_mapping`` (-1: skip).
    An fp8 cache stores ``k / k_scale`` and ``v / v_scale``, saturated."""
    num_tokens, num_kv_heads, head_size = k.shape
    if num_tokens == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k/v head dimension must be contiguous"
    _reshape_and_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        1.0 / k_scale, 1.0 / v_scale,
        NUM_KV_HEADS=num_kv_heads, KVH_P2=_p2(num_kv_heads), HEAD_SIZE=head_size,
        BLOCK_SIZE=k_cache.shape[1], FP8=_is_fp8(k_cache), FP8_MAX=_fp8_max(k_cache),
        num_warps=4 if num_kv_heads * head_size >= 1024 else 1, **pdl_args(k.device))


def rotary_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> None:
    """NeoX rotary and the cache write in one launch: rotates ``q`` ``[T, H, D]`` in place for
    every token, and writes NeoX-rotated ``k`` and ``v`` ``[T, KVH, D]`` into the caches at
    ``slot_mapping`` (-1: no write) like ``reshape_and_cache``. ``k`` is left as it was.
    ``positions``: ``[T]`` indices into ``cos_sin_cache`` ``[max_position, D]`` (cos in the
    first half, sin in the second). Same values as ``TritonOps.rotary_embedding`` followed by
    ``reshape_and_cache``."""
    num_tokens, num_heads, head_size = q.shape
    num_kv_heads = k.shape[1]
    if cos_sin_cache.shape[-1] != head_size:
        raise ValueError(f"cos_sin_cache width {cos_sin_cache.shape[-1]} != head_size "
                         f"{head_size}: the fused rotary rotates whole heads (NeoX) only.")
    if head_size < 16 or head_size & (head_size - 1):
        raise ValueError(f"the fused rotary needs a power-of-two head size >= 16, got "
                         f"{head_size}.")
    if num_tokens == 0:
        return
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, \
        "q/k/v head dimension must be contiguous"
    assert cos_sin_cache.stride(-1) == 1 and positions.numel() == num_tokens
    _rotary_and_cache_kernel[(num_tokens,)](
        positions.reshape(-1), cos_sin_cache, q, k, v, k_cache, v_cache, slot_mapping,
        cos_sin_cache.stride(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), 1.0 / k_scale, 1.0 / v_scale,
        NUM_HEADS=num_heads, HEADS_P2=_p2(num_heads), NUM_KV_HEADS=num_kv_heads,
        KVH_P2=_p2(num_kv_heads), HEAD_SIZE=head_size, BLOCK_SIZE=k_cache.shape[1],
        FP8=_is_fp8(k_cache), FP8_MAX=_fp8_max(k_cache), num_warps=4, **pdl_args(k.device))
