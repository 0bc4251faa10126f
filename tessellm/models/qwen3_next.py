"""Qwen3-Next (``Qwen3NextForCausalLM``: Qwen3-Next-80B-A3B-Instruct / -Thinking): a hybrid of
gated DeltaNet linear attention and gated full attention, each layer with Qwen-MoE's sparse MLP
(experts plus a sigmoid-gated shared expert)::

    config.layer_types[i]:  "linear_attention" -> gated DeltaNet (``layers/gated_deltanet.py``),
                                                  a per-request recurrent state
                            "full_attention"   -> gated attention: q_proj gives each head its
                                                  query and an output gate, q/k RMS-normed per
                                                  head, partial rotary (partial_rotary_factor),
                                                  paged KV cache, o_proj(out * sigmoid(gate))
    every layer's MLP:      SparseMoeBlock with shared expert, or a dense SwiGLU where
                            mlp_only_layers / decoder_sparse_step say so (Qwen2-MoE's rules)

Every RMSNorm but the DeltaNet's gated one scales by ``1 + weight`` (HF's ``Qwen3NextRMSNorm``):
the loader adds the 1 (as Gemma's). Checkpoint names are HF's; ``mtp.*`` (the multi-token
prediction head, unused by HF too) is skipped. What a recurrent state cannot do yet is refused
as for the Mamba models (``models/state_space.py``). Tensor parallelism splits the DeltaNet
heads by key head (``GatedDeltaNet``), attention heads, and the experts' intermediate size.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.gated_deltanet import DeltaNetShape, GatedDeltaNet
from tessellm.layers.linear import ColumnParallelLinear, materialize
from tessellm.layers.norm import add_and_norm
from tessellm.models.decoder import DecoderAttention, DecoderLayer, shard_heads
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.moe import Qwen2MoeForCausalLM

_LINEAR_ATTN = re.compile(r"(?:model\.)?layers\.(\d+)\.linear_attn\.(.+)$")
# the (1 + w) norms: the layers' two, the final one, attention's q/k norms (not linear_attn.norm)
_SHIFTED_NORM = re.compile(r"(?:model\.)?(?:norm|layers\.\d+\.(?:input_layernorm|"
                           r"post_attention_layernorm|self_attn\.[qk]_norm))\.weight$")
_KINDS = ("linear_attention", "full_attention")


class GatedAttention(DecoderAttention):
    """``DecoderAttention`` (q/k norms, rotary, paged attention, o_proj) whose q_proj rows hold,
    per head, the query then its output gate::

        q_proj rows:  [ q_0 gate_0 | q_1 gate_1 | ... ]   (head_dim each)
        out = attention(q, k, v) * sigmoid(gate)  -> o_proj
    """

    def __init__(self, config, ctx: ModelContext, rotary, bias: bool):
        super().__init__(config, ctx, rotary, qkv_bias=bias, qk_norm=True, o_bias=bias)
        tp, d = ctx.tp, self.head_size
        total_kv = config.num_key_value_heads
        _, _, kv_first = shard_heads(config.num_attention_heads, total_kv, tp.rank, tp.size)
        ranges = [(tp.rank * 2 * self.q_size, 2 * self.q_size), (kv_first * d, self.kv_size),
                  (kv_first * d, self.kv_size)]
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, [2 * config.num_attention_heads * d, total_kv * d, total_kv * d],
            bias=bias, quant_method=ctx.quant_method, tp=tp, shard_ranges=ranges)

    def forward(self, positions, hidden, metadata):
        t = hidden.shape[0]
        qg, k, v = self.qkv_proj(hidden).split([2 * self.q_size, self.kv_size, self.kv_size],
                                               dim=-1)
        q, gate = qg.reshape(t, self.num_heads, 2, self.head_size).unbind(2)
        q, k = self.norm_qk(q.reshape(t, self.q_size), k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, metadata) * torch.sigmoid(gate.reshape(t, self.q_size))
        return self.o_proj(out)


class LinearAttentionLayer(nn.Module):
    """A decoder layer whose token mixer is a gated DeltaNet (``linear_attn``)::

        input_layernorm(h, res) -> linear_attn -> post_attention_layernorm(h, res) -> mlp
    """

    def __init__(self, mixer: GatedDeltaNet, mlp: nn.Module, norm, tp, first: bool):
        """``norm(reduce)`` builds a norm summing its input over ``reduce``: under tensor
        parallelism the previous layer's MLP and the mixer's ``out_proj`` leave partial sums
        (the first layer's input, the embedding, is whole)."""
        super().__init__()
        self.linear_attn = mixer
        self.mlp = mlp
        self.input_layernorm = norm(None if first else tp)
        self.post_attention_layernorm = norm(tp)

    def forward(self, positions, hidden, residual, metadata):
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        hidden = self.linear_attn(hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def deltanet_shape(config) -> DeltaNetShape:
    return DeltaNetShape(hidden_size=config.hidden_size, key_heads=config.linear_num_key_heads,
                         value_heads=config.linear_num_value_heads,
                         key_dim=config.linear_key_head_dim,
                         value_dim=config.linear_value_head_dim,
                         conv_width=config.linear_conv_kernel_dim, eps=config.rms_norm_eps)


class Qwen3NextForCausalLM(Qwen2MoeForCausalLM):
    qk_norm = True

    def __init__(self, config, ctx: ModelContext):
        self.kinds = list(config.layer_types)
        if len(self.kinds) != config.num_hidden_layers or set(self.kinds) - set(_KINDS):
            raise ValueError(f"config.layer_types must name {config.num_hidden_layers} layers, "
                             f"each one of {_KINDS}; it is {self.kinds}.")
        super().__init__(config, ctx)
        if not self.attention_layers():  # none in the model, or in this pipeline stage
            ctx.make_attention_kernel(None)  # the runner's step metadata; no layer attends

    def check_config(self, config) -> None:
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"Qwen3-Next hidden_act {config.hidden_act!r} is not supported; "
                             "only silu is.")

    def attention_biases(self, config) -> tuple[bool, bool]:
        return LlamaForCausalLM.attention_biases(self, config)  # llama's (Qwen2-MoE's are fixed)

    def layer_window(self, config, index: int) -> Optional[int]:
        return None

    def make_attention(self, config, ctx: ModelContext, rotary, index: int) -> nn.Module:
        return GatedAttention(config, ctx, rotary, self.attention_biases(config)[0])

    def make_layer(self, config, ctx: ModelContext, rotary, index: int) -> nn.Module:
        if self.kinds[index] == "full_attention":
            return super().make_layer(config, ctx, rotary, index)
        return LinearAttentionLayer(GatedDeltaNet(deltanet_shape(config), ctx),
                                    self.make_mlp(config, ctx, index),
                                    lambda reduce: self.make_norm(config, ctx, reduce), ctx.tp,
                                    first=index == 0)

    def attention_layers(self) -> list:
        return [layer.self_attn.attn for layer in self.layers if isinstance(layer, DecoderLayer)]

    def mamba_layers(self) -> list[GatedDeltaNet]:
        """The layers holding a per-request recurrent state (the state cache's name for them)."""
        return [layer.linear_attn for layer in self.layers
                if isinstance(layer, LinearAttentionLayer)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        loaded |= super().load_weights(self._own_tensors(weights, loaded))
        return loaded

    def _own_tensors(self, weights, loaded: set[str]):
        """Loads the DeltaNet tensors (adding their names to ``loaded``), shifts the (1 + w)
        norms, skips the MTP head; yields the rest."""
        for name, tensor in weights:
            if name.startswith("mtp."):
                continue
            match = _LINEAR_ATTN.match(name)
            if (match is not None and int(match[1]) < len(self.kinds)
                    and not self.start_layer <= int(match[1]) < self.end_layer):
                continue  # another pipeline stage's layer
            if match is not None:
                self._linear_layer(int(match[1]), name).load_checkpoint_tensor(match[2], tensor)
                loaded.add(f"layers.{match[1]}.linear_attn.{match[2]}")
                continue
            if _SHIFTED_NORM.match(name):
                tensor = materialize(tensor) + 1
            yield name, tensor

    def _linear_layer(self, index: int, name: str) -> GatedDeltaNet:
        """Layer ``index``'s DeltaNet, for the checkpoint tensor ``name``; refused when the
        config builds no such layer (its ``layer_types`` do not match the weights)."""
        kind = self.kinds[index] if index < len(self.kinds) else None
        if kind != "linear_attention":
            built = f"makes layer {index} {kind}" if kind else f"has {len(self.kinds)} layers"
            raise ValueError(f"Checkpoint tensor {name!r} belongs to a linear-attention layer, "
                             f"but config.layer_types {built}; the config does not match the "
                             "weights.")
        return self.layers[index].linear_attn
