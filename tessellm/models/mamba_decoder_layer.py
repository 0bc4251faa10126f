"""A hybrid model's Mamba decoder layer (Granite 4.0-H, Bamba): ``DecoderLayer``'s shape with a
Mamba2 mixer where the attention was, so the layers of one model chain the same way::

    layer i:  input_layernorm(h, res) -> mamba -> (* residual_multiplier)
              -> post_attention_layernorm(h, res) -> mlp -> (* residual_multiplier)

Returns ``(hidden, residual)`` like ``DecoderLayer``: the next layer's input norm adds them.
One device only (``models/state_space.py``), so no norm sums over tensor ranks.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from tessellm.layers.mamba_mixer import MambaMixer2


class MambaDecoderLayer(nn.Module):
    def __init__(self, mamba: MambaMixer2, mlp: nn.Module, norm: Callable[[], nn.Module],
                 residual_multiplier: float = 1.0):
        """``norm()`` builds each of the two RMSNorms."""
        super().__init__()
        self.mamba = mamba
        self.mlp = mlp
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.residual_multiplier = residual_multiplier

    def forward(self, positions, hidden, residual, metadata):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.mamba(hidden)
        if self.residual_multiplier != 1.0:
            hidden = hidden * self.residual_multiplier
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        out = self.mlp(hidden)
        if self.residual_multiplier != 1.0:
            out = out * self.residual_multiplier
        return out, residual
