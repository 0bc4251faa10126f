"""Phi (``PhiForCausalLM``: phi-1, phi-1.5, phi-2): the llama decoder's attention and a gelu
MLP in a parallel block on one LayerNorm (``parallel_block.py``)::

    h = h + dense(attn(ln(h))) + fc2(gelu_new(fc1(ln(h))))

with what else differs from Llama: LayerNorms with a weight and a bias (``layer_norm_eps``),
the final one named ``final_layernorm``; a bias on every projection (q/k/v, ``dense``, fc1,
fc2) and on the LM head; partial rotary (``partial_rotary_factor``, 0.5 by default: the
rotary reads it from the config). Both sublayers sum their own outputs over the tensor ranks
(they have biases), so the norms do not.

Not implemented, refused at load: ``qk_layernorm`` (no released Phi checkpoint sets it).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.context import ModelContext
from tessellm.layers.layer_norm import LayerNorm
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.decoder import DecoderAttention
from tessellm.models.dense_mlp import DenseMLP
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.parallel_block import ParallelBlockLayer


class PhiForCausalLM(LlamaForCausalLM):
    lm_head_bias = True
    # attention's ``dense`` is our o_proj, fc1/fc2 DenseMLP's (one shard each: both loaders)
    stacked_params = LlamaForCausalLM.stacked_params + (
        (".self_attn.dense.", ".self_attn.o_proj.", 0),
        (".mlp.fc1.", ".mlp.fc_in.", 0), (".mlp.fc2.", ".mlp.fc_out.", 0),
    )

    def make_layer(self, config, ctx: ModelContext, rotary: RotaryEmbedding,
                   index: int) -> nn.Module:
        attention = DecoderAttention(config, ctx, rotary, qkv_bias=True, qk_norm=False,
                                     o_bias=True)
        mlp = DenseMLP(config, ctx, bias=True, family="Phi")
        return ParallelBlockLayer(ctx, index, attention, mlp,
                                  lambda reduce: self.make_norm(config, ctx, reduce), summed=True)

    def make_norm(self, config, ctx: ModelContext, reduce: Optional[TensorParallel]) -> nn.Module:
        return LayerNorm(config.hidden_size, config.layer_norm_eps, reduce=reduce,
                         has_weight=True, has_bias=True)

    def mlp_bias(self, config) -> bool:
        return True  # the layers' outputs are summed (output_summed)

    def check_config(self, config) -> None:
        if getattr(config, "qk_layernorm", False):
            raise ValueError("Phi config qk_layernorm=True is not supported yet; Phi models with "
                             "it false (phi-1, phi-1.5, phi-2) load.")

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        """HF names; ``final_layernorm`` is our ``norm``, the head's bias only on the last
        pipeline stage."""
        def renamed():
            for name, tensor in weights:
                if name == "lm_head.bias" and not self.pp.is_last:
                    continue
                yield name.replace("model.final_layernorm.", "model.norm."), tensor

        return renamed()
