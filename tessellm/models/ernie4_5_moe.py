"""ERNIE 4.5 MoE (``Ernie4_5_MoeForCausalLM``: ERNIE-4.5-21B-A3B, 300B-A47B): ERNIE 4.5 dense's
attention (interleaved rotary, ``use_bias``; ``ernie4_5.py``) with MoE MLPs on the layers
``i`` with ``(i + 1) % moe_layer_interval == 0`` and ``moe_layer_start_index <= i <=
moe_layer_end_index`` (-1: the last layer); the others are dense (``intermediate_size``).

A MoE MLP: ``moe_num_experts`` experts of ``moe_intermediate_size`` picked ``moe_k`` a token
by the softmax router with a selection bias (``moe_routing.route_biased_softmax``: the
checkpoint's ``mlp.moe_statics.e_score_correction_bias``), plus ``moe_num_shared_experts``
shared experts as one dense MLP of that many times ``moe_intermediate_size``, added unweighted.
The LM head has a bias when ``use_bias``. The MTP layers (``mtp_*``) are skipped here; they
draft with ``speculative_config`` method ``mtp`` (``models/mtp.py``).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.layers.context import ModelContext
from tessellm.layers.moe import FusedMoE
from tessellm.models.decoder import DecoderMLP
from tessellm.models.deepseek_v2 import _router_float32
from tessellm.models.ernie4_5 import Ernie4_5ForCausalLM
from tessellm.models.moe import _MoeForCausalLM
from tessellm.models.moe_routing import route_biased_softmax


class ErnieMoE(nn.Module):
    """Router (replicated, float32), routed experts and shared experts. The output is a
    partial sum under tensor parallelism, or summed here when the shared experts' down_proj
    has a bias (``summed``: it sums itself, so the experts' part must be whole too)."""

    def __init__(self, config, ctx: ModelContext, quant, summed: bool):
        super().__init__()
        experts, inter = config.moe_num_experts, config.moe_intermediate_size
        self.top_k, self.norm_min = config.moe_k, float(getattr(config, "moe_norm_min", 1e-12))
        self.gate = nn.Linear(config.hidden_size, experts, bias=False, dtype=torch.float32)
        self.gate.weight.requires_grad_(False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, experts, dtype=torch.float32),
                                                    requires_grad=False)
        self.experts = FusedMoE(experts, config.hidden_size, inter, self.top_k, ctx.ops,
                                tp=ctx.tp, quant=quant)
        shared = getattr(config, "moe_num_shared_experts", 0) or 0
        self.shared_experts = (DecoderMLP(config, ctx, inter * shared, bias=summed)
                               if shared else None)
        self.tp = ctx.tp if summed else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.gate.weight.float())
        weights, ids = route_biased_softmax(logits, self.e_score_correction_bias[0], self.top_k,
                                            self.norm_min)
        out = self.experts.forward_routed(x, weights.to(x.dtype), ids)
        if self.tp is not None:
            out = self.tp.all_reduce(out)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class Ernie4_5_MoeForCausalLM(_MoeForCausalLM, Ernie4_5ForCausalLM):
    def __init__(self, config, ctx: ModelContext):
        self.lm_head_bias = self.mlp_bias(config)
        super().__init__(config, ctx)

    def mlp_bias(self, config) -> bool:
        return Ernie4_5ForCausalLM.mlp_bias(self, config)

    def num_experts(self, config) -> int:
        return config.moe_num_experts

    def is_sparse(self, config, index: int) -> bool:
        end = config.moe_layer_end_index
        end = config.num_hidden_layers - 1 if end is None or end < 0 else end
        interval = config.moe_layer_interval or 1
        return (self.num_experts(config) > 0 and (index + 1) % interval == 0
                and (config.moe_layer_start_index or 0) <= index <= end)

    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        bias = self.mlp_bias(config)
        if not self.is_sparse(config, index):
            return DecoderMLP(config, ctx, bias=bias)
        return ErnieMoE(config, ctx, self.layer_expert_quant(config, ctx, index), summed=bias)

    def rename(self, name: str) -> str:
        return name.replace(".mlp.moe_statics.", ".mlp.")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """As the MoE families, the router kept float32 (as DeepSeek's); the MTP module's
        tensors (``mtp_*``, ``model.mtp_*``) are skipped."""
        return super().load_weights((n, _router_float32(n, t)) for n, t in weights
                                    if not _is_mtp(n))


def _is_mtp(name: str) -> bool:
    return name.startswith(("mtp", "model.mtp"))
