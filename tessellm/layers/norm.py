"""RMSNorm through the backend's fused op."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from tessellm.distributed.parallel_state import TensorParallel


class RMSNorm(nn.Module):
    """``reduce``: a tensor-parallel group whose ranks each hold a partial sum of ``x`` (the
    unreduced output of a ``RowParallelLinear(reduce_results=False)``). With a residual, the
    norm then sums it over the group first: through the backend's fused
    ``all_reduce_add_rms_norm`` where it has one (one launch for the all-reduce, the residual
    add and the norm), else ``tp.all_reduce`` followed by ``fused_add_rms_norm``."""

    def __init__(self, hidden_size: int, eps: float, ops, reduce: Optional["TensorParallel"] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        self.ops = ops
        self.reduce = reduce if reduce is not None and reduce.size > 1 else None
        self._fused_reduce = getattr(ops, "all_reduce_add_rms_norm", None) if self.reduce else None

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """Without ``residual``: the norm of x. With it: ``(norm(x + residual), x + residual)``,
        x first summed over ``reduce``'s group when set."""
        if residual is None:
            if self.reduce is not None:
                raise ValueError("RMSNorm(reduce=...) sums a partial x into a residual; it was "
                                 "called without one.")
            return self.ops.rms_norm(x, self.weight, self.eps)
        if self.reduce is not None:
            if self._fused_reduce is not None:
                return self._fused_reduce(x, residual, self.weight, self.eps, self.reduce)
            x = self.reduce.all_reduce(x)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
