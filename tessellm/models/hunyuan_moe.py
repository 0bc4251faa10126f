"""Hunyuan MoE (``HunYuanMoEV1ForCausalLM``: Hunyuan-A13B): Hunyuan dense's attention (per-head
q/k RMSNorm after rotary, NTK-alpha rope; ``hunyuan.py``) with a MoE MLP on every layer, as HF
transformers builds it:

- a float32 router (``mlp.gate.wg``): softmax over ``num_experts``, the top ``moe_topk``,
  renormalized to sum to 1 (``moe_topk`` may be one value a layer);
- ``num_experts`` experts of ``intermediate_size`` (HF reads no other size), plus one shared
  MLP of ``intermediate_size`` (``mlp.shared_mlp``) added unweighted.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.layers.context import ModelContext
from tessellm.layers.moe import FusedMoE
from tessellm.models.decoder import DecoderMLP
from tessellm.models.deepseek_v2 import _router_float32
from tessellm.models.hunyuan import HunYuanDenseV1ForCausalLM
from tessellm.models.moe import _MoeForCausalLM


def _of_layer(value, index: int) -> int:
    """A config value given once or one a layer."""
    return int(value[index] if isinstance(value, (list, tuple)) else value)


class HunyuanMoE(nn.Module):
    """Router (replicated, float32), experts and the shared MLP; a partial sum under tensor
    parallelism."""

    def __init__(self, config, ctx: ModelContext, index: int, quant):
        super().__init__()
        experts = int(config.num_experts)
        self.top_k = _of_layer(config.moe_topk, index)
        self.gate = nn.Linear(config.hidden_size, experts, bias=False, dtype=torch.float32)
        self.gate.weight.requires_grad_(False)
        self.experts = FusedMoE(experts, config.hidden_size, config.intermediate_size,
                                self.top_k, ctx.ops, tp=ctx.tp, quant=quant)
        self.shared_mlp = DecoderMLP(config, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = F.linear(x.float(), self.gate.weight.float()).softmax(dim=-1)
        weights, ids = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts.forward_routed(x, weights, ids) + self.shared_mlp(x)


class HunYuanMoEV1ForCausalLM(_MoeForCausalLM, HunYuanDenseV1ForCausalLM):
    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        return HunyuanMoE(config, ctx, index, self.layer_expert_quant(config, ctx, index))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """As the MoE families; the router (``mlp.gate.wg``) is our ``mlp.gate``, kept
        float32."""
        renamed = ((n.replace(".mlp.gate.wg.", ".mlp.gate."), t) for n, t in weights)
        return super().load_weights((n, _router_float32(n, t)) for n, t in renamed)
