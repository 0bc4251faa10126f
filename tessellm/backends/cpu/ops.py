"""The cpu backend's ``FusedOps`` (the reference ops, plus a ``linear`` for wide products) and
``LogitsOps`` (the reference bitmask, plus a two-pass argmax)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tessellm.backends.cpu.moe import fused_moe_grouped
from tessellm.backends.reference.logits import ReferenceLogitsOps
from tessellm.backends.reference.ops import ReferenceOps

# Column blocks of a wide product (the LM head: N = vocab). 2 cores (AVX-512), float32, x
# [64, 576] @ W[49152, 576].T: 34 ms in blocks of 2048 columns against 54 ms in one call
# (MKL); equal at one row. Each output element is the same dot over K either way: the blocked
# result is bitwise identical (checked at M = 1..64), so greedy parity with HF is unchanged.
BLOCK_N = 2048
MIN_N = 8 * BLOCK_N
MIN_M = 8


class CpuOps(ReferenceOps):
    fused_moe = staticmethod(fused_moe_grouped)  # the sort-and-group MoE (cpu/moe.py)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
        """``x @ weight.T (+ bias)``; float32 products of at least ``MIN_M`` rows and ``MIN_N``
        columns run in column blocks into one output, all others in one ``F.linear``."""
        n = weight.shape[0]
        if (bias is not None or x.dim() != 2 or x.shape[0] < MIN_M or n < MIN_N
                or x.dtype != torch.float32 or weight.dtype != torch.float32):
            return F.linear(x, weight, bias)
        out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
        for start in range(0, n, BLOCK_N):
            torch.mm(x, weight[start:start + BLOCK_N].t(), out=out[:, start:start + BLOCK_N])
        return out


# Columns per chunk of the two-pass argmax. torch's CPU argmax over a row is a scalar loop
# (measured on 2 cores, [64, 49152] float32: ~8 ms at one thread, amax ~0.5 ms).
ARGMAX_CHUNK = 1024


def chunked_argmax(x: torch.Tensor, divisor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(x / divisor).argmax(-1)``, exactly (ties and NaN to the lowest index, as torch), in two
    passes: the vectorised ``amax`` of each ``ARGMAX_CHUNK`` columns, then ``argmax`` over the
    chunk maxima (the first chunk holding the row's maximum) and within that chunk only::

        row  [3 9 1 | 9 2 0 | 4]   chunk maxima [9 9 4] -> chunk 0 -> column 1
    """
    if divisor is not None:
        x = x / divisor
    rows, n = x.shape[0], x.shape[-1]
    if x.dim() != 2 or n < 2 * ARGMAX_CHUNK:
        return x.argmax(dim=-1)
    full = n // ARGMAX_CHUNK * ARGMAX_CHUNK
    maxima = x[:, :full].reshape(rows, -1, ARGMAX_CHUNK).amax(dim=-1)  # [rows, chunks]
    if full < n:
        maxima = torch.cat([maxima, x[:, full:].amax(dim=-1, keepdim=True)], dim=1)
    start = maxima.argmax(dim=-1) * ARGMAX_CHUNK  # [rows]
    # Past the last column, the window repeats it: later than the real one, never chosen first.
    cols = (start[:, None] + torch.arange(ARGMAX_CHUNK, device=x.device)).clamp_(max=n - 1)
    return start + x.gather(1, cols).argmax(dim=-1)


class CpuLogitsOps(ReferenceLogitsOps):
    """The reference bitmask, plus ``chunked_argmax`` for the sampler (greedy rows and the
    exponential race of random sampling)."""

    name = "cpu"
    argmax = staticmethod(chunked_argmax)
