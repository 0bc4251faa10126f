"""DeepSeek-V2 / V2-Lite (``DeepseekV2ForCausalLM``) and DeepSeek-V3 / R1
(``DeepseekV3ForCausalLM``): the llama decoder's pre-norm layers with multi-head latent
attention (``deepseek_mla.py``: a latent KV cache of ``kv_lora_rank + qk_rope_head_dim`` values
a token, all heads together) and DeepSeek's MoE.

MLP of layer ``i``: dense (``intermediate_size``) for ``i < first_k_dense_replace`` and where
``i % moe_layer_freq != 0`` (DeepSeek's own code; HF reads only the first), else a
``DeepseekMoE``: the grouped router (``moe_routing.py``), ``n_routed_experts`` experts of
``moe_intermediate_size`` through ``FusedOps.fused_experts``, plus ``n_shared_experts`` shared
experts as one dense MLP of ``n_shared_experts * moe_intermediate_size``, added unweighted.

Checkpoint names are HF's (= DeepSeek's): ``self_attn.{q_proj | q_a_proj, q_a_layernorm,
q_b_proj}``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``;
``mlp.gate.weight`` (+ ``e_score_correction_bias`` in V3), ``mlp.experts.<e>.gate_proj|up_proj|
down_proj``, ``mlp.shared_experts.*``. V3's multi-token-prediction layers (``layers.<L>`` past
``num_hidden_layers``) are skipped here; they draft with ``speculative_config`` method ``mtp``
(``models/mtp.py``).

fp8 checkpoints (DeepSeek-V3/R1's block-wise ``weight_scale_inv``): the MLPs, shared experts and
routed experts keep fp8 (``layers/moe_fp8.py``); MLA's projections are dequantized to the model
dtype as they load (``quantization.fp8_block.dequantized_stream``): the MLA layers have no
quantized path (their ``kv_b_proj`` is absorbed into the attention). AWQ / GPTQ int4
checkpoints likewise: the routed experts keep int4 (``layers/moe_int4.py``), the MLPs and shared
experts take the int4 linears, MLA's projections are dequantized as they load
(``quantization.int4.dequantized_int4_stream``).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.layers.context import ModelContext
from tessellm.layers.moe import FusedMoE
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.decoder import DecoderMLP
from tessellm.models.deepseek_mla import MLAttention
from tessellm.models.llama import _strip_prefix
from tessellm.models.moe import _MoeForCausalLM
from tessellm.models.moe_routing import V2_METHODS, check_grouping, route_v2, route_v3
from tessellm.quantization.bnb_stored import dense_form
from tessellm.quantization.fp8_block import dequantized_stream
from tessellm.quantization.int4 import dequantized_int4_stream

_ATTN_WEIGHT = re.compile(r"^layers\.\d+\.self_attn\.\w+\.weight$")
# MLA's projections: whole tensors, cut by each layer's own tensor-parallel split.
_MLA_LINEAR = re.compile(r"^(layers\.\d+\.self_attn\."
                         r"(?:q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj))\.(weight|bias)$")


class DeepseekRouter(nn.Module):
    """The router: float32 logits of the float32 input (as HF), then V2's or V3's grouped
    top-k. Replicated under tensor parallelism."""

    def __init__(self, config, v3: bool):
        super().__init__()
        experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.v3 = v3
        self.scaling = float(getattr(config, "routed_scaling_factor", 1.0) or 1.0)
        self.weight = nn.Parameter(torch.empty(experts, config.hidden_size, dtype=torch.float32),
                                   requires_grad=False)
        if v3:
            self.n_group, self.topk_group = check_grouping(
                experts, self.top_k, config.n_group, config.topk_group, need_two=True)
            self.renormalize = bool(getattr(config, "norm_topk_prob", False))
            self.e_score_correction_bias = nn.Parameter(torch.empty(experts, dtype=torch.float32),
                                                        requires_grad=False)
        else:
            self.method = config.topk_method or "greedy"
            self.n_group = self.topk_group = 1
            if self.method == "group_limited_greedy":
                self.n_group, self.topk_group = check_grouping(
                    experts, self.top_k, config.n_group, config.topk_group, need_two=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight)
        if self.v3:
            return route_v3(logits, self.e_score_correction_bias, self.top_k, self.n_group,
                            self.topk_group, self.renormalize, self.scaling)
        return route_v2(logits, self.top_k, self.method, self.n_group, self.topk_group,
                        self.scaling)


class DeepseekMoE(nn.Module):
    """Routed experts plus shared experts; the output is a partial sum under tensor
    parallelism (each rank holds a slice of every expert and of the shared MLP)."""

    def __init__(self, config, ctx: ModelContext, v3: bool, quant=None):
        super().__init__()
        inter = config.moe_intermediate_size
        self.gate = DeepseekRouter(config, v3)
        self.experts = FusedMoE(config.n_routed_experts, config.hidden_size, inter,
                                config.num_experts_per_tok, ctx.ops, tp=ctx.tp, quant=quant,
                                expert_parallel=ctx.expert_parallel)
        shared = getattr(config, "n_shared_experts", None) or 0
        self.shared_experts = DecoderMLP(config, ctx, inter * shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts.forward_routed(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DeepseekV2ForCausalLM(_MoeForCausalLM):
    v3 = False
    # Only the MLPs' gate/up fuse; MLA's projections load whole (``load_weights``).
    stacked_params = ((".gate_proj.", ".gate_up_proj.", 0), (".up_proj.", ".gate_up_proj.", 1))

    def rope_interleaved(self, config) -> bool:
        return True  # HF's DeepseekV2 rotates complex pairs: always interleaved

    def check_config(self, config) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"DeepSeek hidden_act {act!r} is not supported; only silu is.")
        if self.v3:
            return
        method = config.topk_method or "greedy"
        if method not in V2_METHODS:
            raise ValueError(f"DeepSeek-V2 topk_method {method!r} is not supported; use one of "
                             f"{', '.join(V2_METHODS)} (V3's noaux_tc is DeepseekV3ForCausalLM).")
        if getattr(config, "norm_topk_prob", False) and config.num_experts_per_tok > 1:
            raise ValueError("DeepSeek-V2 with norm_topk_prob=true is not supported: DeepSeek's "
                             "code renormalizes instead of applying routed_scaling_factor, HF "
                             "transformers ignores the flag; no released V2 checkpoint sets it.")

    def make_rotary(self, config, head_size: int, ctx: ModelContext):
        return RotaryEmbedding.from_config(config, config.qk_rope_head_dim, ctx.ops,
                                           max_positions=ctx.max_positions)

    def make_attention(self, config, ctx: ModelContext, rotary, index: int) -> Optional[nn.Module]:
        return MLAttention(config, ctx, rotary, self.rope_interleaved(config))

    def num_experts(self, config) -> int:
        return config.n_routed_experts

    def is_sparse(self, config, index: int) -> bool:
        freq = getattr(config, "moe_layer_freq", 1) or 1
        return (config.n_routed_experts > 0 and index >= (config.first_k_dense_replace or 0)
                and index % freq == 0)

    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        if not self.is_sparse(config, index):
            return DecoderMLP(config, ctx)
        return DeepseekMoE(config, ctx, self.v3, self.layer_expert_quant(config, ctx, index))

    def attention_biases(self, config) -> tuple[bool, bool]:
        return False, False  # MLA's biases are its own (``attention_bias``, deepseek_mla.py)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """MLA's projections go whole to their layers (each cuts its tensor-parallel part);
        the rest as for the MoE families (experts stacked, shared experts' gate/up fused)."""
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        quant = self.expert_quant
        if quant is not None and quant.kind in ("awq", "gptq"):  # MLA's projections made dense
            weights = dequantized_int4_stream(weights, quant.kind, quant.group_size,
                                              quant.zero_offset, _is_mla_weight)
        elif quant is not None and quant.kind == "bnb4":  # MLA's projections made dense
            weights = ((n, dense_form(t) if _is_mla_weight(n) else t) for n, t in weights)
        elif quant is not None:  # an fp8 checkpoint: MLA's projections made dense
            weights = dequantized_stream(weights, quant.block, _is_mla_weight)

        def others():
            for name, tensor in weights:
                short = _strip_prefix(name)
                match = _MLA_LINEAR.match(short) if short else None
                if match is None:
                    yield name, _router_float32(name, tensor)
                elif self._owns(short):
                    modules[match.group(1)].load_shard(match.group(2), tensor, None)
                    loaded.add(short)

        loaded |= super().load_weights(others())
        return loaded


def _is_mla_weight(name: str) -> bool:
    """Every attention projection (``o_proj`` too) of an MLA layer."""
    short = _strip_prefix(name)
    return short is not None and _ATTN_WEIGHT.match(short) is not None


def _router_float32(name: str, tensor):
    """The router's weight and V3's correction bias as stored, not cast to the model's dtype:
    they stay float32 (as HF keeps them), and V3's checkpoints store the bias in float32, where
    bfloat16 would move it by up to 2**-9 of its size and change which experts some tokens pick."""
    if name.endswith((".mlp.gate.weight", "e_score_correction_bias")) and hasattr(
            tensor, "stored"):
        return tensor.stored().float()
    return tensor


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """V3 / R1: sigmoid routing with the correction bias (``moe_routing.route_v3``), and
    ``rope_interleave`` (default true) choosing the interleaved rope pairs."""

    v3 = True

    def rope_interleaved(self, config) -> bool:
        return bool(getattr(config, "rope_interleave", True))
