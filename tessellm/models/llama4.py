"""Llama 4 text (``Llama4ForCausalLM``; the language model of ``Llama4ForConditionalGeneration``,
Scout and Maverick, ``llama4_mm.py``): the llama decoder with

- rope layers and NoPE layers: ``no_rope_layers[i]`` 1 rotates layer ``i``'s q and k (every
  fourth layer is NoPE by default). Rope layers rotate interleaved pairs (HF multiplies complex
  numbers ``x[2i] + j x[2i+1]``): q and k are reordered per head, evens then odds, for the
  backends' NeoX rotary (``interleaved_rotary.py``), which leaves q.k unchanged.
- ``use_qk_norm``: rope layers' q and k L2-normed per head after the rotation (an RMSNorm
  without weight, ``rms_norm_eps``).
- chunked local attention on the rope layers when ``attention_chunk_size`` is set (their
  ``layer_types`` entry ``chunked_attention``): a query sees only the keys of its own chunk
  (``layers/chunked_attention.py``); NoPE layers attend the whole sequence.
- ``attn_temperature_tuning`` on NoPE layers: q scaled per token by
  ``1 + attn_scale * log(1 + floor((position + 1) / floor_scale))``.
- MoE layers (``moe_layers``: every ``interleave_moe_layer_step``-th, the others dense with
  ``intermediate_size_mlp``): a shared expert plus ``num_local_experts`` routed ones of
  ``intermediate_size``. The router's top-k logits pass through a sigmoid and the score scales
  the expert's *input*, not its output (experts are not linear, so it cannot move)::

      out = shared(x) + sum over the top-k experts e of x:  expert_e(sigmoid(logit_e) * x)

  served as ``k`` calls of ``FusedMoE.forward_routed`` (one per rank of the top k, the input
  pre-scaled, the weight 1); Scout and Maverick route top-1: one call.

Checkpoint names: ``feed_forward`` is our ``mlp``; the experts come stacked and transposed
against a linear's weight (``experts.gate_up_proj [E, H, 2I]``, gate columns first, and
``experts.down_proj [E, I, H]``) and load expert by expert (``layers.moe.stacked_expert_weights``);
the router is ``feed_forward.router``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.linear import Linear
from tessellm.layers.moe import EXPERT_PARTS, FusedMoE, stacked_expert_weights
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.decoder import DecoderAttention, DecoderMLP
from tessellm.models.interleaved_rotary import evens_then_odds
from tessellm.models.llama import LlamaForCausalLM, _strip_prefix

LAYER_TYPES = ("chunked_attention", "full_attention")


class Llama4Attention(DecoderAttention):
    def __init__(self, config, ctx: ModelContext, rotary: RotaryEmbedding, index: int):
        self.use_rope = bool(config.no_rope_layers[index])
        chunked = layer_types(config)[index] == "chunked_attention"
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, ctx, rotary if self.use_rope else None, qkv_bias=bias,
                         qk_norm=False, o_bias=bias,
                         attention_chunk_size=config.attention_chunk_size if chunked else None)
        qk_norm = self.use_rope and getattr(config, "use_qk_norm", False)
        self.l2_eps = config.rms_norm_eps if qk_norm else None
        self.temperature = None  # (floor_scale, attn_scale) on NoPE layers
        if not self.use_rope and getattr(config, "attn_temperature_tuning", False):
            self.temperature = (float(config.floor_scale), float(config.attn_scale))

    def norm_qk(self, q, k):
        """Rope layers: HF's complex pairs reordered for the NeoX rotary, then the L2 norm
        (per head; it commutes with the rotation). NoPE layers: q scaled by the temperature
        (in ``forward``, which knows the positions)."""
        if not self.use_rope:
            return q, k
        d = self.head_size
        q, k = evens_then_odds(q, d, d), evens_then_odds(k, d, d)
        if self.l2_eps is not None:
            q, k = self._l2_norm(q), self._l2_norm(k)
        return q, k

    def _l2_norm(self, x: torch.Tensor) -> torch.Tensor:
        heads = x.float().view(x.shape[0], -1, self.head_size)
        normed = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + self.l2_eps)
        return normed.to(x.dtype).view(x.shape)

    def forward(self, positions, hidden, metadata):
        if self.temperature is None:
            return super().forward(positions, hidden, metadata)
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        floor_scale, attn_scale = self.temperature
        scale = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
        q = (q.view(q.shape[0], -1, self.head_size) * scale[:, None, None]).to(q.dtype)
        return self.o_proj(self.attn(q.view(k.shape[0], -1), k, v, metadata))


class Llama4MoE(nn.Module):
    """The replicated router, the routed experts and the shared expert (module docstring);
    the output is a partial sum under tensor parallelism, like the dense MLP's."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        experts, hidden = config.num_local_experts, config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.router = Linear(hidden, [experts])
        self.experts = FusedMoE(experts, hidden, config.intermediate_size, self.top_k, ctx.ops,
                                tp=ctx.tp)
        self.shared_expert = DecoderMLP(config, ctx, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, ids = torch.topk(self.router(x), self.top_k, dim=-1)
        scores = torch.sigmoid(top.float()).to(x.dtype)
        ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        out = self.shared_expert(x)
        for j in range(self.top_k):
            out = out + self.experts.forward_routed(x * scores[:, j:j + 1], ones, ids[:, j:j + 1])
        return out


def layer_types(config) -> list[str]:
    """HF's ``layer_types`` (transformers 5), else derived as HF does: a rope layer is chunked
    when ``attention_chunk_size`` is set."""
    types = getattr(config, "layer_types", None)
    if types is None:
        chunk = getattr(config, "attention_chunk_size", None)
        types = ["chunked_attention" if rope and chunk is not None else "full_attention"
                 for rope in config.no_rope_layers]
    return list(types)


def moe_layers(config) -> list[int]:
    layers = getattr(config, "moe_layers", None)
    if layers is None:
        step = getattr(config, "interleave_moe_layer_step", 1) or 1
        layers = range(step - 1, config.num_hidden_layers, step)
    return list(layers)


class Llama4ForCausalLM(LlamaForCausalLM):
    def __init__(self, config, ctx: ModelContext):
        if ctx.quant_method is not None:
            raise NotImplementedError(
                "Llama4ForCausalLM does not run quantized linears yet; load it unquantized "
                "(the released FP8 Maverick checkpoint is not supported).")
        super().__init__(config, ctx)

    def make_attention(self, config, ctx: ModelContext, rotary, index: int) -> nn.Module:
        return Llama4Attention(config, ctx, rotary, index)

    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        if index in set(moe_layers(config)):
            return Llama4MoE(config, ctx)
        return DecoderMLP(config, ctx, config.intermediate_size_mlp)

    def mlp_bias(self, config) -> bool:
        return False

    def check_config(self, config) -> None:
        n = config.num_hidden_layers
        rope = getattr(config, "no_rope_layers", None)
        if rope is None or len(rope) != n or any(r not in (0, 1) for r in rope):
            raise ValueError(f"Llama 4 config no_rope_layers={rope!r} is not supported: it must "
                             f"list 1 (rope) or 0 (NoPE) for each of the {n} layers.")
        types = layer_types(config)
        bad = [t for t in types if t not in LAYER_TYPES]
        if len(types) != n or bad:
            raise ValueError(f"Llama 4 config layer_types={types!r} is not supported: it must "
                             f"list one of {', '.join(LAYER_TYPES)} for each of the {n} layers.")
        chunk = getattr(config, "attention_chunk_size", None)
        if "chunked_attention" in types and not (isinstance(chunk, int) and chunk > 0):
            raise ValueError(f"Llama 4 config attention_chunk_size={chunk!r} is not supported "
                             "with chunked_attention layers: it must be a positive integer.")
        if any(t == "chunked_attention" and not r for t, r in zip(types, rope)):
            raise ValueError("Llama 4 config has a chunked_attention NoPE layer (layer_types "
                             "vs no_rope_layers); HF chunks the rope layers only.")
        layers = moe_layers(config)
        if any(not 0 <= i < n for i in layers):
            raise ValueError(f"Llama 4 config moe_layers={layers!r} names layers outside "
                             f"0..{n - 1}.")
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Llama 4 hidden_act {act!r} is not supported; only silu is.")
        floor_scale = getattr(config, "floor_scale", None)
        if getattr(config, "attn_temperature_tuning", False) and 0 in rope and not (
                isinstance(floor_scale, (int, float)) and math.isfinite(floor_scale)
                and floor_scale > 0):
            raise ValueError(f"Llama 4 config floor_scale={floor_scale!r} is not supported: "
                             "attn_temperature_tuning needs a positive number.")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        modules = dict(self.named_modules())
        filled: dict[str, set] = {}  # experts module -> the (expert, part) loaded

        def others():
            for name, tensor in weights:
                short = _strip_prefix(name)
                if short is None:
                    continue
                short = short.replace(".feed_forward.", ".mlp.")
                if not short.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                    yield short, tensor
                    continue
                prefix, _, kind = short.rpartition(".")
                if not self._owns(prefix):
                    continue
                for expert, part, piece in stacked_expert_weights(
                        kind, tensor, self.config.hidden_size, self.config.intermediate_size):
                    params = modules[prefix].load_expert(expert, part, piece)
                    loaded.update(f"{prefix}.{param}" for param in params)
                    filled.setdefault(prefix, set()).add((expert, EXPERT_PARTS[part]))

        loaded |= super().load_weights(others())
        for prefix, seen in filled.items():
            if len(seen) != 3 * modules[prefix].w13.shape[0]:
                raise ValueError(f"The checkpoint lacks experts.gate_up_proj or "
                                 f"experts.down_proj of {prefix}; is it complete?")
        return loaded

