"""The cuda backend's ``FusedOps``: the portable Triton ops (``tessellm.kernels.fused_ops``)
plus what is CUDA's own, the all-reduce + residual add + RMSNorm in one kernel over symmetric
memory (``allreduce_norm.py``)."""

from __future__ import annotations

import torch

from tessellm import envs
from tessellm.backends.cuda.allreduce_norm import workspace
from tessellm.kernels.fused_ops import TritonOps


class CudaOps(TritonOps):
    """``TritonOps`` with the fused all-reduce + norm (``FusedOps.all_reduce_add_rms_norm``)."""

    # The decoder's norms split between the one-row GEMVs around them unless
    # TESSELLM_NORM_FOLD2=0, for dense 16-bit weights (models.decoder.norm_fold2_on): timed on
    # an H100 (session 20), B1 bf16 -1.75%; not on ROCm (TritonOps there: never timed).
    norm_fold_default = True

    def all_reduce_add_rms_norm(self, x, residual, weight, eps, tp):
        """``fused_add_rms_norm(tp.all_reduce(x), residual, weight, eps)`` in one kernel where
        the group has symmetric memory and x fits its buffers (``allreduce_norm.py``; CUDA
        only: not validated on ROCm)."""
        if x.is_cuda and torch.version.hip is None and envs.fused_all_reduce_norm():
            ws = workspace(tp, x.dtype, x.shape[-1])
            if ws is not None and ws.fits(x) and x.shape[-1] <= self.max_hidden:
                return ws(x, residual, weight, eps)
        return self.fused_add_rms_norm(tp.all_reduce(x), residual, weight, eps)
