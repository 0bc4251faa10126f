"""The parallel attention + MLP block (Cohere, Phi, GPT-NeoX with ``use_parallel_residual``):
both sublayers read the same residual stream and their outputs join it together::

    h = h + attn(input_layernorm(h)) + mlp(x)
        x = input_layernorm(h)             one norm (Cohere, Phi)
        x = post_attention_layernorm(h)    a norm of its own (GPT-NeoX)

Under tensor parallelism the two outputs are either both partial sums (no biases: their sum is
one too, summed by the next layer's input_layernorm or the final norm, the llama loop's
convention) or both summed already (``summed``: o_proj and the MLP's last projection reduce
themselves); a family with a bias on one of them asks the other to reduce as well.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn

from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.context import ModelContext
from tessellm.layers.norm import add_and_norm


class ParallelBlockLayer(nn.Module):
    def __init__(self, ctx: ModelContext, index: int, attention: nn.Module, mlp: nn.Module,
                 norm: Callable[[Optional[TensorParallel]], nn.Module], summed: bool,
                 mlp_norm: bool = False):
        """``attention``: a ``DecoderAttention`` (subclass); ``norm(reduce)`` builds a norm
        summing its input over ``reduce`` when set; ``summed``: both sublayers sum their own
        outputs; ``mlp_norm``: the MLP reads ``post_attention_layernorm(h)``."""
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = norm(ctx.tp if index > 0 and not summed else None)
        # it norms the residual stream input_layernorm has summed: nothing to reduce
        self.post_attention_layernorm = norm(None) if mlp_norm else None

    def forward(self, positions, hidden, residual, metadata):
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        mlp_in = hidden if self.post_attention_layernorm is None else \
            self.post_attention_layernorm(residual)
        return self.self_attn(positions, hidden, metadata) + self.mlp(mlp_in), residual
