"""NeoX rotary embedding in Triton (in place on q and k), and the rotation helpers the
attention cache write fuses (``rope_halves``, ``rotate_heads``). Rounds cos/sin and each product
to x's dtype like the torch expression of ``backends/reference/ops.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tessellm.kernels.pdl import pdl_start


@triton.jit
def rope_halves(x1, x2, cos, sin, dt: tl.constexpr):
    """NeoX rotation of a head's halves ``x1``, ``x2`` (any dtype; rounded like torch's ``dt``
    arithmetic). Returns ``(x1 cos - x2 sin, x2 cos + x1 sin)`` in ``dt``; ``cos``/``sin``
    broadcast against the halves. Shared with the attention kernel's fused rotary cache write.
    """
    # Products of two 16-bit floats are exact in float32, so rounding each float32 product to
    # dt reproduces torch's 16-bit arithmetic bit for bit (and keeps bf16 math off the Triton
    # interpreter, which cannot do arithmetic on bf16).
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    c = cos.to(dt).to(tl.float32)
    s = sin.to(dt).to(tl.float32)
    o1 = (x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)
    o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt)


@triton.jit
def rope_full(x, xp, cos, sin, sign, dt: tl.constexpr):
    """``rope_halves`` over whole heads at once: ``x`` ``[..., D]``, ``xp`` its partner
    (element ``(d + D/2) % D``), ``sign`` -1 in the first half and +1 in the second, ``cos``/
    ``sin`` at ``d % (D/2)``. The same arithmetic as ``rope_halves``: the same bits in 16-bit
    dtypes (in float32 the compiler may contract either into FMAs differently)."""
    c = cos.to(dt).to(tl.float32)
    s = sin.to(dt).to(tl.float32)
    o = (x.to(tl.float32) * c).to(dt).to(tl.float32)
    return (o + sign * (xp.to(tl.float32) * s).to(dt).to(tl.float32)).to(dt)


@triton.jit
def rotate_heads(x_ptr, row, stride_t, stride_h, cos, sin,
                 NUM_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HALF: tl.constexpr,
                 HALF_P2: tl.constexpr):
    """Rotates the ``NUM_HEADS`` heads of token ``row`` in place; ``cos``/``sin``: ``[HALF_P2]``."""
    h = tl.arange(0, HEADS_P2)[:, None]
    j = tl.arange(0, HALF_P2)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    ptr = x_ptr + row * stride_t + h * stride_h + j
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    o1, o2 = rope_halves(x1, x2, cos[None, :], sin[None, :], x_ptr.dtype.element_ty)
    tl.store(ptr, o1, mask=mask)
    tl.store(ptr + HALF, o2, mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cache,
                   NUM_Q_HEADS: tl.constexpr, Q_HEADS_P2: tl.constexpr,
                   NUM_K_HEADS: tl.constexpr, K_HEADS_P2: tl.constexpr,
                   HALF: tl.constexpr, HALF_P2: tl.constexpr, USE_PDL: tl.constexpr):
    """One token per program; rotates all its q and k heads in place."""
    pdl_start(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_P2)
    cos = tl.load(cache_ptr + pos * stride_cache + j, mask=j < HALF, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + j, mask=j < HALF, other=0.0)
    rotate_heads(q_ptr, t, stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, Q_HEADS_P2, HALF, HALF_P2)
    rotate_heads(k_ptr, t, stride_kt, stride_kh, cos, sin, NUM_K_HEADS, K_HEADS_P2, HALF, HALF_P2)
