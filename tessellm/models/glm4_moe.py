"""GLM-4.5 / GLM-4.6 (``Glm4MoeForCausalLM``): the llama decoder's attention with DeepSeek-V3's
MoE (``deepseek_v2.py``). What differs from each:

- from Llama: rotary on each head's first ``partial_rotary_factor`` (0.5) dims, NeoX halves
  (HF's GPT-NeoX ``apply_rotary_pos_emb``); q/k/v biases per ``attention_bias``, none on
  o_proj; with ``use_qk_norm``, q and k RMS-normed per head before rotary (as Qwen3);
- from DeepSeek-V3: plain multi-head attention instead of MLA. The MLP is V3's: dense for the
  first ``first_k_dense_replace`` layers, then the sigmoid grouped top-k router with
  ``e_score_correction_bias`` (``moe_routing.route_v3``), ``n_routed_experts`` experts and
  ``n_shared_experts`` shared ones added unweighted.

Checkpoint names are HF's: llama's attention and dense MLP, DeepSeek's ``mlp.gate``,
``mlp.experts.<e>.*`` and ``mlp.shared_experts.*``. The multi-token-prediction layers
(``layers.<num_hidden_layers>...``) are skipped as DeepSeek-V3's are (they draft with
``speculative_config`` method ``mtp``, ``models/mtp.py``).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.models.deepseek_v2 import DeepseekV3ForCausalLM, _router_float32
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.moe import _MoeForCausalLM


class Glm4MoeForCausalLM(DeepseekV3ForCausalLM):
    stacked_params = LlamaForCausalLM.stacked_params  # q/k/v and gate/up fuse as llama's

    def __init__(self, config, ctx: ModelContext):
        self.qk_norm = self.uses_qk_norm(config)
        super().__init__(config, ctx)

    def uses_qk_norm(self, config) -> bool:
        return bool(getattr(config, "use_qk_norm", False))

    def make_rotary(self, config, head_size: int, ctx: ModelContext):
        return LlamaForCausalLM.make_rotary(self, config, head_size, ctx)

    def make_attention(self, config, ctx: ModelContext, rotary, index: int) -> Optional[nn.Module]:
        return None  # llama's DecoderAttention, from the switches

    def attention_biases(self, config) -> tuple[bool, bool]:
        return bool(getattr(config, "attention_bias", False)), False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """As the MoE families (experts stacked), the router kept float32 as DeepSeek's."""
        return _MoeForCausalLM.load_weights(self, ((n, _router_float32(n, t)) for n, t in weights))
