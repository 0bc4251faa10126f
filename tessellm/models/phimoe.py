"""Phi-3.5-MoE (``PhimoeForCausalLM``): Mixtral's layout (``models/moe.py``: experts
``block_sparse_moe.experts.<e>.w1|w2|w3``, router ``block_sparse_moe.gate``) with

- LayerNorm with weight and bias (eps ``rms_norm_eps``) for every norm;
- q/k/v/o biases (``attention_bias``) and an LM-head bias (``lm_head_bias``);
- LongRoPE whose cos/sin are scaled by ``short_mscale`` / ``long_mscale`` (``layers/rotary.py``);
- sparsemixer routing (HF ``sparsemixer`` at inference; the training-time Gumbel sampling and
  Heun's gradient estimate do not apply), exactly two experts per token::

      s = router logits (float32), eps = router_jitter_noise
      e1 = argmax s;   m1 = s[e1]
      w1 = softmax(s masked to -inf where (m1 - s) / max(|s|, m1) > 2 eps)[e1]
      s' = s with e1 at -inf;  e2 = argmax s';  m2 = s'[e2]
      w2 = softmax(s' masked to -inf where (m2 - s) / max(|s|, m2) > 2 eps)[e2]

  The weights are not renormalized: ``out = w1 * expert_e1(x) + w2 * expert_e2(x)``.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.context import ModelContext
from tessellm.layers.layer_norm import LayerNorm
from tessellm.layers.linear import Linear
from tessellm.layers.moe import FusedMoE
from tessellm.layers.rope_config import rope_parameters
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.moe import MixtralForCausalLM

logger = logging.getLogger(__name__)


def sparsemixer_top2(router_logits: torch.Tensor,
                     jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, 2] float32, expert ids [T, 2] int64)`` (module docstring)."""
    scores = router_logits.float()
    first, first_id = _sparsemixer_pick(scores, scores, jitter_eps)
    rest = scores.scatter(-1, first_id, float("-inf"))
    second, second_id = _sparsemixer_pick(rest, scores, jitter_eps)
    return torch.cat((first, second), dim=-1), torch.cat((first_id, second_id), dim=-1)


def _sparsemixer_pick(candidates: torch.Tensor, scores: torch.Tensor,
                      jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The best of ``candidates`` and its softmax weight among the candidates within the
    relative ``2 * jitter_eps`` of it (measured on the unmasked ``scores``, as HF)."""
    best, best_id = candidates.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=best)
    far = (best - scores) / factor > 2 * jitter_eps
    gates = torch.softmax(candidates.masked_fill(far, float("-inf")), dim=-1)
    return gates.gather(-1, best_id), best_id


class SparsemixerMoeBlock(nn.Module):
    """The replicated router (``gate``) and the experts, routed by ``sparsemixer_top2``; the
    output is a partial sum under tensor parallelism, like ``SparseMoeBlock``'s."""

    def __init__(self, experts: FusedMoE, hidden: int, num_experts: int, jitter_eps: float):
        super().__init__()
        self.gate = Linear(hidden, [num_experts])
        self.experts = experts
        self.jitter_eps = jitter_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = sparsemixer_top2(self.gate(x), self.jitter_eps)
        return self.experts.forward_routed(x, weights, ids)


class PhimoeForCausalLM(MixtralForCausalLM):
    def __init__(self, config, ctx: ModelContext):
        self.lm_head_bias = bool(getattr(config, "lm_head_bias", False))
        super().__init__(config, ctx)

    def attention_biases(self, config) -> tuple[bool, bool]:
        return LlamaForCausalLM.attention_biases(self, config)  # llama's, not Mixtral's

    def make_norm(self, config, ctx: ModelContext, reduce: Optional[TensorParallel]) -> nn.Module:
        return LayerNorm(config.hidden_size, config.rms_norm_eps, reduce=reduce,
                         has_weight=True, has_bias=True)

    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        experts = FusedMoE(config.num_local_experts, config.hidden_size, config.intermediate_size,
                           2, ctx.ops, tp=ctx.tp,
                           quant=self.layer_expert_quant(config, ctx, index))
        return SparsemixerMoeBlock(experts, config.hidden_size, config.num_local_experts,
                                   float(getattr(config, "router_jitter_noise", 0.0) or 0.0))

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        """The head's bias only on the last pipeline stage (the one with the head)."""
        return ((n, t) for n, t in weights if n != "lm_head.bias" or self.pp.is_last)

    def check_config(self, config) -> None:
        top_k = getattr(config, "num_experts_per_tok", 2)
        if top_k != 2:
            raise ValueError(f"Phi-3.5-MoE config num_experts_per_tok={top_k} is not supported: "
                             "its sparsemixer router always picks exactly 2 experts (as HF "
                             "transformers does whatever the field says); set it to 2.")
        if config.num_local_experts < 2:
            raise ValueError(f"Phi-3.5-MoE config num_local_experts={config.num_local_experts} "
                             "is not supported: top-2 routing needs at least 2 experts.")
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Phi-3.5-MoE hidden_act {act!r} is not supported; only silu is "
                             "(the fused MoE experts are SwiGLU).")
        params = rope_parameters(config)
        if params["rope_type"] in ("longrope", "su"):
            original = params["original_max_position_embeddings"]
            if config.max_position_embeddings > original:
                logger.warning(
                    "Phi-3.5-MoE LongRoPE: positions from original_max_position_embeddings=%d on "
                    "use the long factors and long_mscale (as vLLM and the model's own code); "
                    "HF transformers 5 keeps the short factors and switches the scale for the "
                    "whole sequence, so past %d tokens outputs differ from HF's.",
                    original, original)
