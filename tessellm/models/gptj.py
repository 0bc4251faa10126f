"""GPT-J (``GPTJForCausalLM``: GPT-J-6B and its fine-tunes, e.g. GPT4All-J, Dolly v1): the
llama decoder's attention and a gelu MLP in a parallel block on one LayerNorm
(``parallel_block.py``)::

    h = h + out_proj(attn(ln_1(h))) + fc_out(gelu_new(fc_in(ln_1(h))))

with what else differs from Llama: LayerNorms with a weight and a bias
(``layer_norm_epsilon``); no biases on q/k/v/out_proj, biases on fc_in/fc_out and the LM
head; rotary on interleaved pairs of each head's first ``rotary_dim`` dims (all of it when
null), served by the NeoX kernels through a reordering of q and k (``interleaved_rotary.py``),
base 10000. The MLP sums its output over the tensor ranks (it has a bias), so out_proj does too.
HF names: ``transformer.wte``, ``transformer.h.N.{ln_1, attn, mlp}``, ``transformer.ln_f``.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.context import ModelContext
from tessellm.layers.layer_norm import LayerNorm
from tessellm.layers.rope_config import rope_max_positions
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.decoder import DecoderAttention
from tessellm.models.checkpoint_rename import llama_form
from tessellm.models.dense_mlp import DenseMLP
from tessellm.models.interleaved_rotary import evens_then_odds
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.parallel_block import ParallelBlockLayer

_PREFIXES = (("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."),
             ("transformer.h.", "model.layers."))
_PARTS = ((".ln_1.", ".input_layernorm."), (".attn.", ".self_attn."))
# buffers some checkpoints carry: the causal mask and the sin/cos table
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".attn.embed_positions")


class GPTJAttention(DecoderAttention):
    def __init__(self, config, ctx: ModelContext, rotary: RotaryEmbedding):
        super().__init__(config, ctx, rotary, qkv_bias=False, qk_norm=False, o_bias=False,
                         reduce_output=True)

    def norm_qk(self, q, k):
        d, r = self.head_size, self.rotary.rotary_dim
        return evens_then_odds(q, d, r), evens_then_odds(k, d, r)


class GPTJForCausalLM(LlamaForCausalLM):
    lm_head_bias = True
    stacked_params = LlamaForCausalLM.stacked_params + (
        (".self_attn.out_proj.", ".self_attn.o_proj.", 0),
        (".mlp.fc_in.", ".mlp.fc_in.", 0), (".mlp.fc_out.", ".mlp.fc_out.", 0),
    )

    def make_layer(self, config, ctx: ModelContext, rotary: RotaryEmbedding,
                   index: int) -> nn.Module:
        inter = getattr(config, "n_inner", None) or 4 * config.hidden_size
        mlp = DenseMLP(config, ctx, bias=True, family="GPT-J", intermediate_size=inter,
                       act=config.activation_function)
        return ParallelBlockLayer(ctx, index, GPTJAttention(config, ctx, rotary), mlp,
                                  lambda reduce: self.make_norm(config, ctx, reduce), summed=True)

    def make_rotary(self, config, head_size: int, ctx: ModelContext):
        return RotaryEmbedding(head_size, rope_max_positions(config), 10000.0, None, ctx.ops,
                               rotary_dim=getattr(config, "rotary_dim", None) or head_size,
                               max_positions=ctx.max_positions)

    def make_norm(self, config, ctx: ModelContext, reduce: Optional[TensorParallel]) -> nn.Module:
        return LayerNorm(config.hidden_size, config.layer_norm_epsilon, reduce=reduce,
                         has_weight=True, has_bias=True)

    def mlp_bias(self, config) -> bool:
        return True  # the layers' outputs are summed (output_summed)

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        """HF names (``_PREFIXES``, ``_PARTS``); the buffers of ``_BUFFERS`` skipped, and the
        head's bias on stages without the head."""
        for name, tensor in weights:
            if name.endswith(_BUFFERS) or (name == "lm_head.bias" and not self.pp.is_last):
                continue
            yield llama_form(name, _PREFIXES, _PARTS), tensor
