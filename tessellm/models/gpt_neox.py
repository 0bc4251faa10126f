"""GPT-NeoX (``GPTNeoXForCausalLM``: Pythia, GPT-NeoX-20B, RedPajama-INCITE, Dolly v2): the
llama decoder's attention and a gelu MLP (``dense_mlp.py``) with what else differs from Llama:

- ``use_parallel_residual`` (every released checkpoint but a few): the two sublayers read the
  same residual stream, each through its own LayerNorm (``parallel_block.py``)::

      h = h + attn(input_layernorm(h)) + mlp(post_attention_layernorm(h))

  otherwise the llama layer's sequential residual, with the same two norms;
- LayerNorms with a weight and a bias (``layer_norm_eps``); biases on every projection (q/k/v
  and ``dense`` per ``attention_bias``, the MLP's always), so the MLP sums its output over the
  tensor ranks itself and the attention does too (the norms sum nothing);
- partial rotary (``rotary_pct`` / ``partial_rotary_factor``, 0.25 by default) on NeoX halves;
- q, k and v fused in ``query_key_value`` per head, which the loader cuts into q/k/v
  (``fused_qkv.py``);

- HF names: ``gpt_neox.embed_in``, ``gpt_neox.layers.N.attention``, ``final_layer_norm``,
  ``embed_out`` (the LM head, never tied in released checkpoints).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.context import ModelContext
from tessellm.layers.layer_norm import LayerNorm
from tessellm.layers.rope_config import rope_parameters
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.decoder import DecoderAttention, DecoderLayer
from tessellm.models.checkpoint_rename import llama_form
from tessellm.models.dense_mlp import DenseMLP
from tessellm.models.fused_qkv import split_per_head
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.parallel_block import ParallelBlockLayer

# HF name prefix -> ours (checked in order; the first that matches is replaced)
_PREFIXES = (("gpt_neox.embed_in.", "model.embed_tokens."),
             ("gpt_neox.final_layer_norm.", "model.norm."),
             ("gpt_neox.layers.", "model.layers."),
             ("embed_out.", "lm_head."))


def split_query_key_value(config, tensor) -> tuple[torch.Tensor, ...]:
    """q, k and v of a ``query_key_value`` weight or bias (per head ``[q_h | k_h | v_h]``, rows
    first), or of a LoRA adapter's B for it (``lora/families.py``)."""
    heads = config.num_attention_heads
    return split_per_head(tensor, heads, getattr(config, "head_dim", None) or
                          config.hidden_size // heads)


class GPTNeoXForCausalLM(LlamaForCausalLM):
    # the attention's ``dense`` is our o_proj; the MLP's two projections DenseMLP's
    stacked_params = LlamaForCausalLM.stacked_params + (
        (".self_attn.dense.", ".self_attn.o_proj.", 0),
        (".mlp.dense_h_to_4h.", ".mlp.fc_in.", 0), (".mlp.dense_4h_to_h.", ".mlp.fc_out.", 0),
    )

    def make_layer(self, config, ctx: ModelContext, rotary: RotaryEmbedding,
                   index: int) -> nn.Module:
        bias = bool(getattr(config, "attention_bias", True))
        attention = DecoderAttention(config, ctx, rotary, qkv_bias=bias, qk_norm=False,
                                     o_bias=bias, reduce_output=True)
        mlp = DenseMLP(config, ctx, bias=True, family="GPT-NeoX")

        def norm(reduce):
            return self.make_norm(config, ctx, reduce)

        if getattr(config, "use_parallel_residual", True):
            return ParallelBlockLayer(ctx, index, attention, mlp, norm, summed=True,
                                      mlp_norm=True)
        return DecoderLayer(config, ctx, rotary, bias, False, index, mlp, input_summed=True,
                            norm=norm, attention=attention)

    def make_rotary(self, config, head_size: int, ctx: ModelContext):
        """transformers 4 names the rotary settings ``rotary_pct`` / ``rotary_emb_base``."""
        params = rope_parameters(config)
        if getattr(config, "rotary_pct", None) is not None:
            params["partial_rotary_factor"] = float(config.rotary_pct)
        if getattr(config, "rotary_emb_base", None) is not None:
            params["rope_theta"] = float(config.rotary_emb_base)
        return RotaryEmbedding.from_config(config, head_size, ctx.ops, params=params,
                                           max_positions=ctx.max_positions)

    def make_norm(self, config, ctx: ModelContext, reduce: Optional[TensorParallel]) -> nn.Module:
        return LayerNorm(config.hidden_size, config.layer_norm_eps, reduce=reduce,
                         has_weight=True, has_bias=True)

    def mlp_bias(self, config) -> bool:
        return True  # the layers' outputs are summed (output_summed)

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        """HF names (module docstring); ``query_key_value`` cut into q/k/v; the causal-mask
        buffers old checkpoints carry (``attention.bias``, ``attention.masked_bias``) skipped."""
        def renamed():
            for name, tensor in weights:
                if name.endswith((".attention.bias", ".attention.masked_bias")):
                    continue
                name = llama_form(name, _PREFIXES, ((".attention.", ".self_attn."),))
                if ".query_key_value." not in name:
                    yield name, tensor
                    continue
                for part, piece in zip(("q_proj", "k_proj", "v_proj"),
                                       split_query_key_value(self.config, tensor)):
                    yield name.replace(".query_key_value.", f".{part}."), piece

        return renamed()
