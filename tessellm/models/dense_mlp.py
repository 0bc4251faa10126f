"""The MLP without a gate (Starcoder2's c_fc/c_proj, Phi's fc1/fc2, GPT-NeoX's
dense_h_to_4h/dense_4h_to_h)::

    fc_out(act(fc_in(x)))      fc_in column-parallel, fc_out row-parallel

Each family renames its checkpoint's two projections to ``fc_in`` / ``fc_out`` on load. Under
tensor parallelism fc_out leaves its output unsummed unless it has a bias or is told to sum
(``reduce_output``), as ``DecoderMLP``'s down_proj does."""

from __future__ import annotations

from typing import Optional, Union

import torch.nn as nn

from tessellm.layers.activation import activation
from tessellm.layers.context import ModelContext
from tessellm.layers.linear import ColumnParallelLinear, RowParallelLinear


class DenseMLP(nn.Module):
    def __init__(self, config, ctx: ModelContext, bias: bool, family: str,
                 reduce_output: bool = False, intermediate_size: Optional[int] = None,
                 act: Optional[Union[str, nn.Module]] = None):
        """``act``: the activation's HF name (None: ``config.hidden_act``), or a module with
        parameters of its own (Apertus's xIELU: ``mlp.act.*``); ``family`` names the model
        when it is refused."""
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.act = act if isinstance(act, nn.Module) else activation(act or config.hidden_act,
                                                                     family)
        self.fc_in = ColumnParallelLinear(config.hidden_size, [inter], bias=bias,
                                          quant_method=ctx.quant_method, tp=ctx.tp)
        self.fc_out = RowParallelLinear(inter, config.hidden_size, bias=bias,
                                        quant_method=ctx.quant_method, tp=ctx.tp,
                                        reduce_results=bias or reduce_output)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))
