"""Falcon (``FalconForCausalLM``: Falcon-7B/40B/180B and their instruct models; Falcon 3 is
Llama): the llama decoder's attention and a gelu MLP without a gate (``dense_mlp.py``), in one
of three layer shapes::

    new_decoder_architecture (40B, 180B)   h = h + attn(ln_attn(h)) + mlp(ln_mlp(h))
                                           (one input_layernorm for both when
                                           num_ln_in_parallel_attn is 1)
    parallel_attn (7B)                     h = h + attn(ln(h)) + mlp(ln(h))
    neither                                the llama layer's sequential residual

with LayerNorms with a weight and a bias (``layer_norm_epsilon``), biases on every projection
per ``bias``, full NeoX rotary, and q/k/v fused in ``query_key_value`` in one of three layouts,
cut on load (``split_query_key_value``; each tensor-parallel rank then takes its own heads)::

    new_decoder_architecture  per KV group: [ q_g0 .. q_g(n-1) | k_g | v_g ]   (n = heads / KV)
    multi_query               [ q0 .. q(H-1) | k | v ]
    otherwise                 per head: [ q_h | k_h | v_h ]                    (fused_qkv.py)

Not implemented, refused at load: ``alibi`` (no kernel applies ALiBi).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.context import ModelContext
from tessellm.layers.layer_norm import LayerNorm
from tessellm.layers.linear import materialize
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.checkpoint_rename import llama_form
from tessellm.models.decoder import DecoderAttention, DecoderLayer
from tessellm.models.dense_mlp import DenseMLP
from tessellm.models.fused_qkv import rows_of_fused, split_per_head
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.parallel_block import ParallelBlockLayer

_PREFIXES = (("transformer.word_embeddings.", "model.embed_tokens."),
             ("transformer.ln_f.", "model.norm."), ("transformer.h.", "model.layers."))


def _layer_shape(config) -> str:
    """"two_norms", "one_norm" (both parallel) or "sequential" (module docstring)."""
    if config.new_decoder_architecture:
        return "one_norm" if config.num_ln_in_parallel_attn == 1 else "two_norms"
    return "one_norm" if config.parallel_attn else "sequential"


def split_query_key_value(config, tensor) -> tuple[torch.Tensor, ...]:
    """q, k and v of a ``query_key_value`` weight or bias (rows first; the three layouts of
    the module docstring), or of a LoRA adapter's B for it (``lora/families.py``)."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // heads
    if config.new_decoder_architecture:
        def cut(rows):
            groups = rows.unflatten(0, (kv, heads // kv + 2, d))
            return (groups[:, :-2].flatten(0, 2), groups[:, -2].flatten(0, 1),
                    groups[:, -1].flatten(0, 1))

        return rows_of_fused(tensor, cut)
    if config.multi_query:
        return materialize(tensor).split([heads * d, d, d], dim=0)
    return split_per_head(tensor, heads, d)


class FalconForCausalLM(LlamaForCausalLM):
    stacked_params = LlamaForCausalLM.stacked_params + (
        (".self_attn.dense.", ".self_attn.o_proj.", 0),
        (".mlp.dense_h_to_4h.", ".mlp.fc_in.", 0), (".mlp.dense_4h_to_h.", ".mlp.fc_out.", 0),
    )

    def make_layer(self, config, ctx: ModelContext, rotary: RotaryEmbedding,
                   index: int) -> nn.Module:
        bias, shape = bool(config.bias), _layer_shape(config)
        attention = DecoderAttention(config, ctx, rotary, qkv_bias=bias, qk_norm=False,
                                     o_bias=bias)
        mlp = DenseMLP(config, ctx, bias=bias, family="Falcon",
                       intermediate_size=config.ffn_hidden_size, act=config.activation)

        def norm(reduce):
            return self.make_norm(config, ctx, reduce)

        if shape == "sequential":
            return DecoderLayer(config, ctx, rotary, bias, False, index, mlp, input_summed=bias,
                                norm=norm, attention=attention)
        return ParallelBlockLayer(ctx, index, attention, mlp, norm, summed=bias,
                                  mlp_norm=shape == "two_norms")

    def make_norm(self, config, ctx: ModelContext, reduce: Optional[TensorParallel]) -> nn.Module:
        return LayerNorm(config.hidden_size, config.layer_norm_epsilon, reduce=reduce,
                         has_weight=True, has_bias=True)

    def mlp_bias(self, config) -> bool:
        return bool(config.bias)

    def check_config(self, config) -> None:
        if getattr(config, "alibi", False):
            raise ValueError("Falcon config alibi=True is not supported: no attention kernel "
                             "applies ALiBi; Falcon models with rotary (alibi false) load.")
        if config.new_decoder_architecture and config.num_ln_in_parallel_attn == 1 and \
                not config.parallel_attn:
            raise ValueError("Falcon config new_decoder_architecture with one norm and "
                             "parallel_attn=False is not supported (HF cannot run it either).")

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        """HF names in llama form (``_PREFIXES``; ``self_attention``; with two norms
        ``ln_attn`` / ``ln_mlp`` are ``input_layernorm`` / ``post_attention_layernorm``);
        ``query_key_value`` cut into q/k/v."""
        two_norms = _layer_shape(self.config) == "two_norms"
        parts = ((".self_attention.", ".self_attn."),) + (
            ((".ln_attn.", ".input_layernorm."), (".ln_mlp.", ".post_attention_layernorm."))
            if two_norms else ())
        for name, tensor in weights:
            name = llama_form(name, _PREFIXES, parts)
            if ".query_key_value." not in name:
                yield name, tensor
                continue
            for part, piece in zip(("q_proj", "k_proj", "v_proj"),
                                   split_query_key_value(self.config, tensor)):
                yield name.replace(".query_key_value.", f".{part}."), piece
