"""Random weights for benchmarks: the real architecture, nothing read from disk."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Fill every parameter in place: norms near 1, everything else small and uniform.

    Values are drawn on the parameter's own device, so an 8B model initialises in seconds.
    """
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.uniform_(0.9, 1.1, generator=gen)
        elif param.is_floating_point():
            param.data.uniform_(-scale, scale, generator=gen)
