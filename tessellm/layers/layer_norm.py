"""LayerNorm (mean-subtracted) over the hidden states, called like ``RMSNorm``: OLMo's has no
weight or bias, Cohere's a weight and no bias, StableLM's both."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from tessellm.distributed.parallel_state import TensorParallel


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps)`` over the last dim, times ``weight`` when ``has_weight``,
    plus ``bias`` when ``has_bias``, computed in float32 like HF's OlmoLayerNorm and CohereLayerNorm; torch's ``layer_norm`` on
    every backend (no backend op to ask for).

    The call interface is ``RMSNorm``'s, so the llama decoder layer takes either: with a
    ``residual`` it returns ``(norm(x + residual), x + residual)``, ``x`` first summed over
    ``reduce``'s tensor-parallel group when set; ``consumer`` (the fp8 fold's hint) is
    accepted and ignored."""

    def __init__(self, hidden_size: int, eps: float, reduce: Optional["TensorParallel"] = None,
                 has_weight: bool = False, has_bias: bool = False):
        super().__init__()
        self.shape = (hidden_size,)
        self.eps = eps
        self.reduce = reduce if reduce is not None and reduce.size > 1 else None
        self.weight = (nn.Parameter(torch.ones(hidden_size), requires_grad=False)
                       if has_weight else None)
        self.bias = (nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
                     if has_bias else None)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                consumer: Optional[nn.Module] = None):
        if residual is None:
            if self.reduce is not None:
                raise ValueError("LayerNorm(reduce=...) sums a partial x into a residual; it "
                                 "was called without one.")
            return self._norm(x)
        if self.reduce is not None:
            x = self.reduce.all_reduce(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.shape, weight, bias, eps=self.eps).to(x.dtype)
