"""The cpu backend's ``FusedOps``: the reference ops, plus a ``linear`` for wide products."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessellm.backends.cpu.moe import fused_moe_grouped
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
