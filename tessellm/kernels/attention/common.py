"""What the attention kernels share: the softmax constants, the fp8 tile widening, the
attention tile (``_attend_tile``) and the host-side checks. See ``tessellm.kernels.attention``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tessellm.kernels.gemm.fp8_codes import e4m3_to_16bit

_LOG2E = 1.4426950408889634


_NEG_BIG = tl.constexpr(-1.0e30)  # running-max start: finite, so masked tiles never give inf - inf
_TWO_LOG2E = tl.constexpr(2.0 * _LOG2E)


@triton.jit
def _softcap(s, cap):
    """Attention logit soft-capping, ``cap * tanh(s / cap)``, on scores ``s`` in log2 units
    (``cap`` too: the caller passes ``logit_softcap * log2(e)``, which commutes with the scale).
    ``tanh(x) = 1 - 2 / (e^(2x) + 1)`` through exp2 (Triton has no portable tanh): +-cap at
    +-inf, absolute error about ``cap * 1e-7`` near 0."""
    e = tl.exp2(s * (_TWO_LOG2E / cap))
    return cap - (2.0 * cap) / (e + 1.0)


@triton.jit
def _join_sinks(acc, m_i, l_i, sinks_ptr, head, row_ok):
    """Attention sinks (``AttentionSpec.attention_sinks``): each row's head's sink logit joins
    the online softmax as one more key with no value, once per row after its keys: the max
    may rise (acc and the sum rescale) and the sum gains ``2^(sink - max)``. ``sinks_ptr``:
    float ``[H]`` in natural-log units; the scores here are in log2 units, so the sink is
    multiplied by log2(e) (never by the softmax scale: it is a logit already)."""
    sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    m_new = tl.maximum(m_i, sink)
    alpha = tl.exp2(m_i - m_new)
    return acc * alpha[:, None], m_new, l_i * alpha + tl.exp2(sink - m_new)


@triton.jit
def _e4m3_to_f16(x):
    """e4m3 -> fp16 in registers, 4 values per 32-bit word (exact). Inline PTX, not marked pure:
    Triton keeps it where it stands instead of moving it into the dot's operand loads."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi;\n"
        "mov.b32 {lo, hi}, $2;\n"
        "cvt.rn.f16x2.e4m3x2 $0, lo;\n"
        "cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r", [x.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def _load_q(q_ptr, tok, head, d, row_ok, stride_qt, stride_qh, scale_log2,
            DOT_FP32: tl.constexpr, FP8_PTX: tl.constexpr):
    """The query rows ``[BLOCK_M, HEAD_SIZE]`` and the factor its dots still need: with fp8
    widening (FP8_PTX) the dots are fp16 and q comes pre-scaled (factor 1); in the interpreter
    (DOT_FP32) tiles take q's dtype, float32."""
    q = tl.load(q_ptr + (tok * stride_qt + head * stride_qh)[:, None] + d[None, :],
                mask=row_ok[:, None], other=0.0)
    qk_scale = scale_log2
    if FP8_PTX != 0:  # fp16 dots on widened e4m3 tiles; q pre-scaled (module docstring)
        q = (q.to(tl.float32) * scale_log2).to(tl.float16)
        qk_scale = 1.0
    elif DOT_FP32:  # tiles take q's dtype
        q = q.to(tl.float32)
    return q, qk_scale


@triton.jit
def _kv_offsets(bt_ptr, n, n_ok, kvh, stride_cb, stride_ct, stride_ch, BLOCK_SIZE: tl.constexpr):
    """Element offsets of keys ``n`` (``[BLOCK_N]``, head ``kvh``) in the paged cache."""
    blk = tl.load(bt_ptr + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    return blk * stride_cb + (n % BLOCK_SIZE) * stride_ct + kvh * stride_ch


@triton.jit
def _widen(x, FP8_PTX: tl.constexpr):
    """A V tile (and K's, but under FP8_PTX 3 and 4) as the dots take it."""
    if FP8_PTX == 4:  # Triton widens it inside the dot's operand load
        x = x.to(tl.float16)
    elif FP8_PTX == 1 or FP8_PTX == 3:
        x = _e4m3_to_f16(x)
    elif FP8_PTX == 2:
        x = e4m3_to_16bit(x, False, False)
    return x


@triton.jit
def _scores(q, m_i, l_i, k, mask, scale_log2, softcap, DOT_PREC: tl.constexpr,
            APPLY_MASK: tl.constexpr, FP8_PTX: tl.constexpr, SOFTCAP: tl.constexpr):
    """First half of an online-softmax step: P, the rescale alpha, the new max and sum.
    SOFTCAP: the scaled scores are soft-capped (``_softcap``, ``softcap`` in log2 units) before
    the mask; a constexpr branch, so kernels without a cap compile as before."""
    if FP8_PTX >= 3:  # K's reduction dim is contiguous: Triton widens it in the dot's operand
        k = k.to(tl.float16)
    else:
        k = _widen(k, FP8_PTX)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * scale_log2
    if SOFTCAP:
        s = _softcap(s, softcap)
    if APPLY_MASK:
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend_kv(q, acc, m_i, l_i, k, v, mask, scale_log2, softcap, DOT_PREC: tl.constexpr,
               APPLY_MASK: tl.constexpr, FP8_PTX: tl.constexpr, SOFTCAP: tl.constexpr):
    """One online-softmax step over loaded K/V tiles ``[BLOCK_N, HEAD_SIZE]`` (cache dtype)."""
    p, alpha, m_i, l_i = _scores(q, m_i, l_i, k, mask, scale_log2, softcap, DOT_PREC, APPLY_MASK,
                                 FP8_PTX, SOFTCAP)
    v = _widen(v, FP8_PTX)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, n, n_ok, mask, kvh,
                 scale_log2, softcap, stride_cb, stride_ct, stride_ch,
                 HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PREC: tl.constexpr,
                 APPLY_MASK: tl.constexpr, FP8_PTX: tl.constexpr, SOFTCAP: tl.constexpr):
    """One online-softmax step over keys ``n`` (``[BLOCK_N]``). ``mask``: ``[BLOCK_M, BLOCK_N]``,
    applied only when APPLY_MASK (tiles every row sees whole skip the select). FP8_PTX: the
    cache is e4m3 and ``q`` fp16, pre-scaled by the caller. SOFTCAP: ``_scores``'."""
    d = tl.arange(0, HEAD_SIZE)
    kv_off = _kv_offsets(bt_ptr, n, n_ok, kvh, stride_cb, stride_ct, stride_ch, BLOCK_SIZE)
    k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
    p, alpha, m_i, l_i = _scores(q, m_i, l_i, k, mask, scale_log2, softcap, DOT_PREC, APPLY_MASK,
                                 FP8_PTX, SOFTCAP)
    v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
    v = _widen(v, FP8_PTX)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
    return acc, m_i, l_i


def _p2(x: int) -> int:
    return triton.next_power_of_2(x)


def _dot_precision(dtype) -> str:
    # tf32x3: three tf32 products, float32-level accuracy on the tensor cores. Ignored for 16-bit.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _dot_fp32(q: torch.Tensor) -> bool:
    """Run the dots in float32 for bf16 on the CPU: there Triton runs in its interpreter, which
    has no bf16 arithmetic (it would multiply the raw bit patterns, triton issue #11584)."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu"


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides, got "
                         f"{tuple(k_cache.shape)}/{k_cache.stride()} and "
                         f"{tuple(v_cache.shape)}/{v_cache.stride()}.")
    if k_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head dimension must be contiguous (stride 1).")


_FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def _is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype in _FP8_CACHE_DTYPES


def _fp8_max(cache: torch.Tensor) -> float:
    return float(torch.finfo(cache.dtype).max) if _is_fp8(cache) else 0.0


@functools.lru_cache(maxsize=None)
def _has_e4m3_cvt(index: int) -> bool:
    """``cvt.rn.f16x2.e4m3x2``: NVIDIA sm89+ (a ROCm build also answers torch.cuda: no PTX)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (8, 9)


_FP8_CONVERT = {"triton": 0, "cvt": 1, "bits": 2, "kdot": 3, "native16": 4}


def _fp8_ptx(q: torch.Tensor, k_cache: torch.Tensor, fp8_convert: str = "auto") -> int:
    """How an e4m3 cache's tiles are widened (module docstring): 0 ``.to(q.dtype)``; with inline
    PTX and fp16 dots, 1 ``cvt.rn.f16x2.e4m3x2``, 2 bit moves (``e4m3_to_16bit``); with fp16
    dots, 3 "kdot" (K widened by Triton inside the dot's operand load, its reduction dim being
    contiguous; V by ``cvt``), 4 "native16" (both by Triton). ``fp8_convert``: "auto", or one of ``_FP8_CONVERT`` (benchmarks)."""
    if fp8_convert != "auto" and fp8_convert not in _FP8_CONVERT:
        raise ValueError(f"fp8_convert is 'auto' or one of {', '.join(_FP8_CONVERT)}, got "
                         f"{fp8_convert!r}.")
    ptx_ok = (k_cache.dtype == torch.float8_e4m3fn and q.is_cuda
              and q.dtype in (torch.float16, torch.bfloat16) and _has_e4m3_cvt(q.device.index or 0))
    if not ptx_ok:
        return 0
    return _FP8_CONVERT[fp8_convert] if fp8_convert != "auto" else 1


def _k_factor(k_cache: torch.Tensor, k_scale: float) -> float:
    return k_scale if _is_fp8(k_cache) else 1.0


def _v_factor(v_cache: torch.Tensor, v_scale: float) -> float:
    return v_scale if _is_fp8(v_cache) else 1.0


def _softcap_log2(logit_softcap) -> float:
    """The kernels' ``softcap`` argument: the cap in the scores' log2 units (0.0: no cap)."""
    if logit_softcap is None:
        return 0.0
    if not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be a positive number or None, got {logit_softcap!r}.")
    return float(logit_softcap) * _LOG2E
