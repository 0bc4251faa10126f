"""Gemma 3 (text): ``Gemma3ForCausalLM``, and the text tower of a Gemma 3 GGUF.

What differs from the llama decoder:

- embeddings are scaled by ``sqrt(hidden_size)`` (rounded to the model dtype, as HF does);
- every RMSNorm multiplies by ``(1 + w)``: the checkpoint's ``w`` is loaded as ``1 + w`` so the
  backend's plain ``rms_norm`` applies it (a GGUF already stores ``1 + w``);
- four norms per layer: the attention and MLP outputs are normed before the residual add
  ("sandwich"), which fits the fused residual-add norm like this::

      h, res = input_layernorm(m, res)          # m: previous layer's output (res = m at layer 0)
      a = post_attention_layernorm(attn(h))
      h, res = pre_feedforward_layernorm(a, res)
      m = post_feedforward_layernorm(mlp(h))    # GeGLU: gelu_tanh(gate) * up

- q and k are RMS-normed per head; attention scales by ``query_pre_attn_scalar ** -0.5``;
- layers are ``sliding_attention`` (window ``sliding_window``, rope base
  ``rope_parameters["sliding_attention"]``) or ``full_attention`` (their own rope base and
  scaling), per ``config.layer_types``: two attention kernels, one per window;
- optional ``final_logit_softcapping``: ``cap * tanh(logits / cap)``.

Under tensor parallelism o_proj and down_proj sum their outputs (the post norms need whole
rows), so the norms here never reduce.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.layers.attention import Attention
from tessellm.layers.context import ModelContext
from tessellm.layers.linear import ColumnParallelLinear, RowParallelLinear, materialize
from tessellm.layers.norm import RMSNorm
from tessellm.layers.rope_config import complete_rope_parameters
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from tessellm.models.decoder import shard_heads
from tessellm.models.llama import LlamaForCausalLM, MissingLayer

SLIDING = "sliding_attention"


class Gemma3Attention(nn.Module):
    def __init__(self, config, ctx: ModelContext, rotary: RotaryEmbedding, window: Optional[int]):
        super().__init__()
        tp, d = ctx.tp, config.head_dim
        total_heads, total_kv = config.num_attention_heads, config.num_key_value_heads
        self.num_heads, self.num_kv_heads, kv_first = shard_heads(total_heads, total_kv, tp.rank,
                                                                  tp.size)
        self.head_size, self.q_size, self.kv_size = d, self.num_heads * d, self.num_kv_heads * d
        ranges = [(tp.rank * self.q_size, self.q_size), (kv_first * d, self.kv_size),
                  (kv_first * d, self.kv_size)]
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = ColumnParallelLinear(config.hidden_size,
                                             [total_heads * d, total_kv * d, total_kv * d], bias=bias,
                                             quant_method=ctx.quant_method, tp=tp, shard_ranges=ranges)
        self.o_proj = RowParallelLinear(total_heads * d, config.hidden_size, bias=bias,
                                        quant_method=ctx.quant_method, tp=tp)
        self.q_norm = RMSNorm(d, config.rms_norm_eps, ctx.ops)
        self.k_norm = RMSNorm(d, config.rms_norm_eps, ctx.ops)
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, d,
                              config.query_pre_attn_scalar ** -0.5, ctx.make_attention_kernel(window))

    def forward(self, positions, hidden, metadata):
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t = q.shape[0]
        q = self.q_norm(q.reshape(t, self.num_heads, self.head_size)).view(t, self.q_size)
        k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_size)).view(t, self.kv_size)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, metadata))


class Gemma3MLP(nn.Module):
    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        inter = config.intermediate_size
        act = getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"Gemma 3 hidden_activation {act!r} is not supported; only "
                             "gelu_pytorch_tanh is.")
        self.inter = inter // ctx.tp.size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [inter, inter],
                                                 quant_method=ctx.quant_method, tp=ctx.tp)
        self.down_proj = RowParallelLinear(inter, config.hidden_size,
                                           quant_method=ctx.quant_method, tp=ctx.tp)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, ctx: ModelContext, rotary: RotaryEmbedding, window: Optional[int]):
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.self_attn = Gemma3Attention(config, ctx, rotary, window)
        self.mlp = Gemma3MLP(config, ctx)
        self.input_layernorm = RMSNorm(hidden, eps, ctx.ops)
        self.post_attention_layernorm = RMSNorm(hidden, eps, ctx.ops)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, ctx.ops)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, ctx.ops)

    def forward(self, positions, hidden, residual, metadata):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, metadata))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Reuses the llama family's forward loop, pipeline stages and weight loading; builds its
    own layers and adds the embedding scale, the ``1 + w`` norms and the logit soft-cap."""

    def __init__(self, config, ctx: ModelContext):
        nn.Module.__init__(self)
        check_config(config)
        self.config = config
        self.pp = ctx.pp
        vocab, hidden = config.vocab_size, config.hidden_size
        self.start_layer, self.end_layer = ctx.pp.layer_range(config.num_hidden_layers)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.embed_scale = float(torch.tensor(hidden ** 0.5).to(ctx.dtype))  # as HF rounds it
        self.softcap = getattr(config, "final_logit_softcapping", None)
        if ctx.pp.is_first:
            self.embed_tokens = VocabParallelEmbedding(vocab, hidden, ctx.tp)
        types = layer_types(config)
        rotaries = {kind: _rotary(config, kind, ctx.ops) for kind in set(types)}
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, ctx, rotaries[kind],
                               config.sliding_window if kind == SLIDING else None)
            if self.start_layer <= i < self.end_layer else MissingLayer()
            for i, kind in enumerate(types))
        if ctx.pp.is_last:
            self.norm = RMSNorm(hidden, config.rms_norm_eps, ctx.ops)
            tied = self.embed_tokens.weight if self.tie_word_embeddings and ctx.pp.is_first else None
            self.lm_head = ParallelLMHead(vocab, hidden, ctx.tp, weight=tied)

    def forward(self, input_ids, positions, metadata, intermediate=None):
        if self.pp.is_first:
            hidden, residual = self.embed_tokens(input_ids) * self.embed_scale, None
        else:
            hidden, residual = intermediate
        for i in range(self.start_layer, self.end_layer):
            hidden, residual = self.layers[i](positions, hidden, residual, metadata)
        if not self.pp.is_last:
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names; every ``*norm.weight`` ``w`` loads as ``1 + w``."""
        def shifted():
            for name, tensor in weights:
                if name.endswith("norm.weight"):
                    tensor = materialize(tensor) + 1
                yield name, tensor

        return super().load_weights(shifted())


def _rotary(config, kind: str, ops) -> RotaryEmbedding:
    """transformers 5: ``rope_parameters[kind]``; 4: the local layers' ``rope_local_base_freq``
    (no scaling), the global layers' ``rope_theta`` and ``rope_scaling``."""
    nested = (getattr(config, "rope_parameters", None) or {}).get(kind)
    if isinstance(nested, dict):
        params = dict(nested)
    elif kind == SLIDING:
        params = {"rope_type": "default",
                  "rope_theta": getattr(config, "rope_local_base_freq", None) or 10_000.0}
    else:
        params = {**(getattr(config, "rope_scaling", None) or {}),
                  "rope_theta": getattr(config, "rope_theta", None) or 1_000_000.0}
    default_theta = 10_000.0 if kind == SLIDING else 1_000_000.0
    params = complete_rope_parameters(params, config, default_theta)
    return RotaryEmbedding.from_config(config, config.head_dim, ops, params=params)


def layer_types(config) -> list[str]:
    """``config.layer_types``; transformers before 4.53 had ``sliding_window_pattern`` instead
    (default 6: every sixth layer global)."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    pattern = getattr(config, "sliding_window_pattern", None) or 6
    return ["full_attention" if (i + 1) % pattern == 0 else SLIDING
            for i in range(config.num_hidden_layers)]


def check_config(config) -> None:
    """Refuses the Gemma 3 variants this implementation would run wrongly."""
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap:
        raise ValueError(f"Gemma 3 attn_logit_softcapping={cap} is not supported (no attention "
                         "kernel applies a logit soft-cap); use a checkpoint with it null.")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("Gemma 3 use_bidirectional_attention=True (an embedding model) is not "
                         "supported; tessellm serves causal language models only.")
    kinds = set(layer_types(config)) - {SLIDING, "full_attention"}
    if kinds:
        raise ValueError(f"Gemma 3 config.layer_types {sorted(kinds)} are not supported; "
                         "supported: sliding_attention, full_attention.")
