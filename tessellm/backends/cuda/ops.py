"""The cuda backend's ``FusedOps``: the portable Triton ops (``tessellm.kernels.fused_ops``)
plus what is CUDA's own: the all-reduce + residual add + RMSNorm in one kernel over symmetric
memory (``allreduce_norm.py``) and the residual add + RMSNorm folded into the one-row GEMV after
it (``kernels/gemm/gemv_norm.py``)."""

from __future__ import annotations

import torch

from tessellm import envs
from tessellm.backends.cuda.allreduce_norm import workspace
from tessellm.kernels.fused_ops import TritonOps
from tessellm.kernels.gemm.gemv_norm import gemv_add_rms_norm, gemv_add_rms_norm_applies


class CudaOps(TritonOps):
    """``TritonOps`` with the fused all-reduce + norm (``FusedOps.all_reduce_add_rms_norm``) and
    the norm folded into the next product (``FusedOps.add_rms_norm_linear``)."""

    def all_reduce_add_rms_norm(self, x, residual, weight, eps, tp):
        """``fused_add_rms_norm(tp.all_reduce(x), residual, weight, eps)`` in one kernel where
        the group has symmetric memory and x fits its buffers (``allreduce_norm.py``; CUDA
        only: not validated on ROCm)."""
        if x.is_cuda and torch.version.hip is None and envs.fused_all_reduce_norm():
            ws = workspace(tp, x.dtype, x.shape[-1])
            if ws is not None and ws.fits(x) and x.shape[-1] <= self.max_hidden:
                return ws(x, residual, weight, eps)
        return self.fused_add_rms_norm(tp.all_reduce(x), residual, weight, eps)

    def add_rms_norm_linear(self, x, residual, norm_weight, eps, weight, bias=None):
        """``(linear(rms_norm(x + residual)), x + residual)``: one launch for a decode step's one
        16-bit row on NVIDIA (``gemv_norm.py``; not measured on ROCm), else the two ops. The
        one-row kernel does not round the normed row to 16 bits (within the contract's
        tolerance, not bit-equal); float32 always takes the two ops."""
        if torch.version.hip is None and gemv_add_rms_norm_applies(x, residual, norm_weight,
                                                                    weight):
            return gemv_add_rms_norm(x, residual, norm_weight, eps, weight, bias)
        normed, residual = self.fused_add_rms_norm(x, residual, norm_weight, eps)
        return self.linear(normed, weight, bias), residual
