"""Starcoder2 (``Starcoder2ForCausalLM``: StarCoder2 3B/7B/15B): the llama decoder with

- LayerNorms with a weight and a bias (``norm_epsilon``), the final one included;
- a bias on every projection, q/k/v/o and the MLP's, per ``use_bias``;
- an MLP without a gate, ``c_proj(act(c_fc(x)))`` (``dense_mlp.py``; ``gelu_pytorch_tanh``);
- ``sliding_window`` on every layer (when set); embeddings tied by default.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.context import ModelContext
from tessellm.layers.layer_norm import LayerNorm
from tessellm.models.dense_mlp import DenseMLP
from tessellm.models.layer_windows import window_everywhere
from tessellm.models.llama import LlamaForCausalLM


class Starcoder2ForCausalLM(LlamaForCausalLM):
    # the MLP's two projections, each one shard of our DenseMLP's (both loaders read these)
    stacked_params = LlamaForCausalLM.stacked_params + (
        (".mlp.c_fc.", ".mlp.fc_in.", 0), (".mlp.c_proj.", ".mlp.fc_out.", 0),
    )

    def make_norm(self, config, ctx: ModelContext, reduce: Optional[TensorParallel]) -> nn.Module:
        return LayerNorm(config.hidden_size, config.norm_epsilon, reduce=reduce,
                         has_weight=True, has_bias=True)

    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        return DenseMLP(config, ctx, bias=self.mlp_bias(config), family="Starcoder2")

    def attention_biases(self, config) -> tuple[bool, bool]:
        return self.mlp_bias(config), self.mlp_bias(config)

    def mlp_bias(self, config) -> bool:
        return bool(getattr(config, "use_bias", True))

    def layer_window(self, config, index: int) -> Optional[int]:
        return window_everywhere(config)
