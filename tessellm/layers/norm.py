"""RMSNorm through the backend's fused op."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from tessellm import envs
from tessellm.layers.linear import fp8_input_dtype

if TYPE_CHECKING:
    from tessellm.distributed.parallel_state import TensorParallel


def add_and_norm(norm, hidden: torch.Tensor, residual: Optional[torch.Tensor], **kw):
    """A layer's opening norm on the residual stream: ``(norm(hidden + residual), hidden +
    residual)`` through the norm's fused add; at the first layer (``residual`` None) the stream
    starts at ``hidden``. ``norm``: a norm module taking ``(x)`` and ``(x, residual)``, as
    ``RMSNorm`` does; ``kw`` goes to it (``consumer``). One helper for the decoder layers'
    first norms, which all begin the stream this way."""
    if residual is None:
        return norm(hidden, **kw), hidden
    return norm(hidden, residual, **kw)


class RMSNorm(nn.Module):
    """``reduce``: a tensor-parallel group whose ranks each hold a partial sum of ``x`` (the
    unreduced output of a ``RowParallelLinear(reduce_results=False)``). With a residual, the
    norm then sums it over the group first: through the backend's fused
    ``all_reduce_add_rms_norm`` where it has one (one launch for the all-reduce, the residual
    add and the norm), else ``tp.all_reduce`` followed by ``fused_add_rms_norm``.

    The fp8 activation fold (on unless ``TESSELLM_FP8_ACT_FOLD=0``; where the backend's ``FusedOps``
    offers ``rms_norm_fp8`` and ``fused_add_rms_norm_fp8``; not with the fused all-reduce):
    given the ``consumer`` of its output, the norm returns it quantized per token (an
    ``Fp8Activation``) where ``layers.linear.fp8_input_dtype`` says that layer wants it so."""

    def __init__(self, hidden_size: int, eps: float, ops, reduce: Optional["TensorParallel"] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        self.ops = ops
        self.reduce = reduce if reduce is not None and reduce.size > 1 else None
        self._fused_reduce = getattr(ops, "all_reduce_add_rms_norm", None) if self.reduce else None
        self._fp8_fold = (envs.fp8_act_fold() and self._fused_reduce is None
                          and getattr(ops, "rms_norm_fp8", None) is not None
                          and getattr(ops, "fused_add_rms_norm_fp8", None) is not None)

    # ``hand_off``'s pair: the result of this norm's next call, computed already
    _handoff: Optional[tuple] = None

    def hand_off(self, normed: torch.Tensor, residual: torch.Tensor) -> None:
        """The layer before computed this norm already (``TESSELLM_GEMV_NORM_EPILOGUE``: the
        add-RMSNorm in its down GEMV's last program, ``models.decoder.link_norm_epilogues``):
        the next call, if it passes exactly these two tensors as ``(x, residual)``, returns
        them as they are. Any other call drops the pair and computes."""
        self._handoff = (normed, residual)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                consumer: Optional[nn.Module] = None):
        """Without ``residual``: the norm of x. With it: ``(norm(x + residual), x + residual)``,
        x first summed over ``reduce``'s group when set. ``consumer``: the layer taking the
        norm, for the fp8 fold (class docstring); the norm may then be an ``Fp8Activation``."""
        handoff = self._handoff
        if handoff is not None:
            self._handoff = None
            if x is handoff[0] and residual is handoff[1]:
                return handoff
        fp8 = fp8_input_dtype(consumer, x.shape[0]) if self._fp8_fold and consumer is not None \
            else None
        if residual is None:
            if self.reduce is not None:
                raise ValueError("RMSNorm(reduce=...) sums a partial x into a residual; it was "
                                 "called without one.")
            if fp8 is not None:
                return self.ops.rms_norm_fp8(x, self.weight, self.eps, fp8)
            return self.ops.rms_norm(x, self.weight, self.eps)
        if self.reduce is not None:
            if self._fused_reduce is not None:
                return self._fused_reduce(x, residual, self.weight, self.eps, self.reduce)
            x = self.reduce.all_reduce(x)
        if fp8 is not None:
            return self.ops.fused_add_rms_norm_fp8(x, residual, self.weight, self.eps, fp8)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
