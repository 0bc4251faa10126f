"""Apertus (``ApertusForCausalLM``: Apertus-8B/70B): the llama decoder with

- an MLP without a gate, ``down_proj(xielu(up_proj(x)))`` (``dense_mlp.py``), whose xIELU
  activation has learned parameters per layer (``mlp.act_fn.*``, ``layers/xielu.py``);
- per-head q/k RMSNorm before rotary (as Qwen3);
- the two norms named ``attention_layernorm`` / ``feedforward_layernorm`` (llama's
  ``input_layernorm`` / ``post_attention_layernorm``); llama3 rope by default.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.xielu import XIELU
from tessellm.models.checkpoint_rename import llama_form
from tessellm.models.dense_mlp import DenseMLP
from tessellm.models.llama import LlamaForCausalLM

_RENAMES = ((".attention_layernorm.", ".input_layernorm."),
            (".feedforward_layernorm.", ".post_attention_layernorm."),
            (".mlp.act_fn.", ".mlp.act."))


class ApertusForCausalLM(LlamaForCausalLM):
    qk_norm = True
    # q/k/v fuse as llama's; the MLP's two projections are each one shard of DenseMLP's
    stacked_params = LlamaForCausalLM.stacked_params[:3] + (
        (".mlp.up_proj.", ".mlp.fc_in.", 0), (".mlp.down_proj.", ".mlp.fc_out.", 0))

    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        act = XIELU() if config.hidden_act == "xielu" else None
        return DenseMLP(config, ctx, bias=False, family="Apertus", act=act)

    def mlp_bias(self, config) -> bool:
        return False

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        return ((llama_form(name, (), _RENAMES), tensor) for name, tensor in weights)
