"""GPT-BigCode (``GPTBigCodeForCausalLM``: StarCoder, StarCoderBase, SantaCoder, WizardCoder,
Octocoder): a GPT-2-style decoder on the llama building blocks, with

- learned absolute position embeddings (``transformer.wpe``, added to the token embeddings;
  no rotary) and LayerNorms with a weight and a bias (``layer_norm_epsilon``);
- q, k and v fused in ``c_attn``: ``[q | k | v]`` with one KV head under ``multi_query``
  (StarCoder), per head (``fused_qkv.py``) without it; the scores scaled by ``head_dim ** -0.5``
  only with ``scale_attn_weights``;
- a bias on every projection; an MLP without a gate (``c_fc`` -> ``activation_function`` ->
  ``c_proj``, ``n_inner`` or 4x hidden wide); embeddings tied by default.

Not implemented, refused at load: ``add_cross_attention`` (an encoder-decoder use).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.context import ModelContext
from tessellm.layers.layer_norm import LayerNorm
from tessellm.layers.linear import materialize
from tessellm.layers.vocab import VocabParallelEmbedding
from tessellm.models.checkpoint_rename import llama_form
from tessellm.models.dense_mlp import DenseMLP
from tessellm.models.fused_qkv import split_per_head
from tessellm.models.llama import LlamaForCausalLM

# HF name part -> ours (prefixes first; the layer parts as transformers' GPTBigCodeBlock)
_PREFIXES = (("transformer.wte.", "model.embed_tokens."), ("transformer.wpe.", "model.wpe."),
             ("transformer.ln_f.", "model.norm."), ("transformer.h.", "model.layers."))
_PARTS = ((".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
          (".attn.", ".self_attn."))


def split_c_attn(config, tensor) -> tuple[torch.Tensor, ...]:
    """q, k and v of a ``c_attn`` weight or bias (rows first), or of a LoRA adapter's B for it
    (``lora/families.py``): ``[q | k | v]`` under ``multi_query``, per head without it."""
    heads = config.num_attention_heads
    d = config.hidden_size // heads
    if getattr(config, "multi_query", True):
        return materialize(tensor).split([heads * d, d, d], dim=0)
    return split_per_head(tensor, heads, d)


class GPTBigCodeForCausalLM(LlamaForCausalLM):
    stacked_params = LlamaForCausalLM.stacked_params + (
        (".self_attn.c_proj.", ".self_attn.o_proj.", 0),
        (".mlp.c_fc.", ".mlp.fc_in.", 0), (".mlp.c_proj.", ".mlp.fc_out.", 0),
    )

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        if ctx.pp.is_first:  # replicated on every tensor rank (one row per position)
            self.wpe = VocabParallelEmbedding(config.max_position_embeddings, config.hidden_size)

    def embed_positions(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return embeds + self.wpe(positions)

    def make_rotary(self, config, head_size: int, ctx: ModelContext):
        return None

    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        inter = getattr(config, "n_inner", None) or 4 * config.hidden_size
        return DenseMLP(config, ctx, bias=True, family="GPT-BigCode", intermediate_size=inter,
                        act=config.activation_function)

    def make_norm(self, config, ctx: ModelContext, reduce: Optional[TensorParallel]) -> nn.Module:
        return LayerNorm(config.hidden_size, config.layer_norm_epsilon, reduce=reduce,
                         has_weight=True, has_bias=True)

    def attention_biases(self, config) -> tuple[bool, bool]:
        return True, True

    def mlp_bias(self, config) -> bool:
        return True

    def attention_scale(self, config) -> Optional[float]:
        return None if getattr(config, "scale_attn_weights", True) else 1.0

    def check_config(self, config) -> None:
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-BigCode config add_cross_attention=True is not supported: it "
                             "adds encoder-decoder cross-attention; decoder-only models load.")

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        """HF names (``_PREFIXES``, ``_PARTS``); ``c_attn`` cut into q/k/v; the causal-mask
        buffers (``attn.bias``, ``attn.masked_bias``) some checkpoints carry skipped."""
        def renamed():
            for name, tensor in weights:
                if name.endswith((".attn.bias", ".attn.masked_bias")):
                    continue
                if name.startswith("transformer.wpe.") and not self.pp.is_first:
                    continue
                name = llama_form(name, _PREFIXES, _PARTS)
                if ".c_attn." not in name:
                    yield name, tensor
                    continue
                for part, piece in zip(("q_proj", "k_proj", "v_proj"),
                                       split_c_attn(self.config, tensor)):
                    yield name.replace(".c_attn.", f".{part}."), piece

        return renamed()
