"""xIELU (Apertus's activation, https://arxiv.org/abs/2411.13010), as HF's ``XIELUActivation``
computes it, with its learned parameters (the checkpoint's ``act_fn.alpha_p`` / ``alpha_n``,
one value each, and its ``beta`` / ``eps`` constants)::

    x > 0:   a_p * x^2 + beta * x                           a_p = softplus(alpha_p)
    x <= 0:  (expm1(min(x, eps)) - x) * a_n + beta * x      a_n = beta + softplus(alpha_n)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class XIELU(nn.Module):
    def __init__(self):
        super().__init__()
        # filled from the checkpoint (HF stores all four)
        self.alpha_p = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.alpha_n = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.beta = nn.Parameter(torch.tensor(0.5), requires_grad=False)
        self.eps = nn.Parameter(torch.tensor(-1e-6), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(x > 0, alpha_p * x * x + self.beta * x,
                           (torch.expm1(torch.minimum(x, self.eps)) - x) * alpha_n + self.beta * x)
