"""A float sum whose bits do not depend on how the compiler spreads the tensor over threads.

``tl.sum`` adds each thread's elements first, then across lanes, then across warps, so which
elements meet in which order follows the tensor's layout; and the layout is the compiler's
choice, driven by the widest vector access among the kernel's loads and stores. Two kernels
that compute the same sum can therefore get different bits: on sm_90 the RMSNorm kernel with a
float32 (16-bit) output holds 4 (8) consecutive elements a thread, and the same norm quantizing
its output to fp8 holds 16 (its 16-byte fp8 store), so ``sum(x * x)`` and the row's ``rstd``
differed in the last bit and the fp8 activation fold was not bitwise the unfused pair.

``pairwise_sum`` fixes the order by index instead: elements ``2i`` and ``2i + 1`` are added,
then the pairs of those sums, and so on (a tree over the index bits, lowest first)::

    x0  x1  x2  x3  x4  x5  x6  x7
     \\  /    \\  /    \\  /    \\  /
     s01     s23     s45     s67          each level: tl.sum over a [n / 2, 2] reshape
        \\    /          \\    /
        s0123           s4567
              \\        /
               s01234567

Each level adds two values, and ``a + b == b + a`` bit for bit, so it does not matter which
thread holds which operand: every layout gives the same tree. A reshape only renames index
bits (no data moves) and a level is one register add, lane shuffle or shared-memory step, as a
``tl.sum`` would do. Only with FMA contraction off: a multiply feeding the first level (``x *
x``) may otherwise fuse into that add in one kernel and not in another, or into different
operands on two lanes. Launch every kernel that uses it with ``enable_fp_fusion=False``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pairwise_sum(x):
    """The sum of a 1-D float tensor (a power-of-two length, as ``tl.arange`` makes it),
    pairwise by index: the same bits in any kernel and any layout."""
    for _ in tl.static_range(32):  # log2 of the length levels; the rest are skipped
        if x.shape[0] > 1:
            x = tl.sum(tl.reshape(x, [x.shape[0] // 2, 2]), 1)
    return tl.sum(x, 0)  # one element
