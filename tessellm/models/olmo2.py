"""OLMo 2 (``Olmo2ForCausalLM``): the llama decoder's attention and MLP, with two differences.

- Norms come after each sublayer, before its residual add, and there is no norm before it::

      h = h + post_attention_layernorm(attn(h))
      h = h + post_feedforward_layernorm(mlp(h))

  A layer returns ``(post_feedforward_layernorm(mlp(h)), h)``, whose sum is the stream, as
  the llama loop expects (the final norm adds them). The post norms need whole rows, so
  o_proj and down_proj sum their outputs over the tensor ranks themselves.

- q and k are RMS-normed over all heads at once (``q_norm.weight`` is ``[heads * head_dim]``),
  not per head. Under tensor parallelism each rank holds some heads: it sums the squares of
  its part, one all-reduce (q and k together) sums them over the ranks, and it scales its part
  by its slice of the weight::

      q: [ rank 0: heads 0..H/T-1 | rank 1: ... ]      mean(q^2) = all_reduce(sum_local) / (H*d)
      k: KV heads split the same way, or replicated on r = T / KVH ranks each when there are
         fewer KV heads than ranks: the all-reduce then counts each KV head r times.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.norm import RMSNorm
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.decoder import DecoderAttention, DecoderMLP, shard_heads
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.qk_norm_weights import local_qk_norm_weights

class Olmo2Attention(DecoderAttention):
    def __init__(self, config, ctx: ModelContext, rotary: RotaryEmbedding,
                 window: Optional[int] = None):
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, ctx, rotary, qkv_bias=bias, qk_norm=False, o_bias=bias,
                         window=window, reduce_output=True)
        tp, d, eps = ctx.tp, self.head_size, config.rms_norm_eps
        total_heads = config.num_attention_heads
        total_kv = getattr(config, "num_key_value_heads", None) or total_heads
        _, _, kv_first = shard_heads(total_heads, total_kv, tp.rank, tp.size)
        self.tp = tp
        # (first element, size) of the whole q / k this rank holds: its slice of each norm weight
        self.q_range = (tp.rank * self.q_size, self.q_size)
        self.k_range = (kv_first * d, self.kv_size)
        self.q_norm = RMSNorm(self.q_size, eps, ctx.ops)
        self.k_norm = RMSNorm(self.kv_size, eps, ctx.ops)
        self.eps = eps
        self.full_sizes = (total_heads * d, total_kv * d)
        self.kv_replicas = max(1, tp.size // total_kv)

    def norm_qk(self, q, k):
        """RMSNorm over the whole q and the whole k (module docstring)."""
        if self.tp.size == 1:
            return self.q_norm(q), self.k_norm(k)
        squares = torch.stack([q.float().square().sum(-1), k.float().square().sum(-1)], dim=-1)
        squares = self.tp.all_reduce(squares)
        mean_q = squares[:, :1] / self.full_sizes[0]
        mean_k = squares[:, 1:] / (self.full_sizes[1] * self.kv_replicas)
        q = (q.float() * torch.rsqrt(mean_q + self.eps)).to(q.dtype) * self.q_norm.weight
        k = (k.float() * torch.rsqrt(mean_k + self.eps)).to(k.dtype) * self.k_norm.weight
        return q, k

    def local_norm_weight(self, which: str, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """This rank's part of the checkpoint's whole ``q_norm`` / ``k_norm`` weight."""
        start, size = self.q_range if which == "q" else self.k_range
        full = self.full_sizes[0 if which == "q" else 1]
        if tensor.shape != (full,):
            raise ValueError(f"Checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                             f"expected ({full},) (OLMo 2 norms the whole {which} across heads); "
                             "the config does not match the weights.")
        return tensor[start:start + size]


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config, ctx: ModelContext, rotary: RotaryEmbedding,
                 window: Optional[int] = None, attention: Optional[nn.Module] = None):
        """``attention``: a ``DecoderAttention`` whose o_proj sums its output (EXAONE 4's, per-head
        q/k norms); None: OLMo 2's."""
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.self_attn = attention or Olmo2Attention(config, ctx, rotary, window)
        self.mlp = DecoderMLP(config, ctx, reduce_output=True)
        self.post_attention_layernorm = RMSNorm(hidden, eps, ctx.ops)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, ctx.ops)

    def forward(self, positions, hidden, residual, metadata):
        if residual is not None:
            hidden = hidden + residual
        attn = self.self_attn(positions, hidden, metadata)
        hidden = hidden + self.post_attention_layernorm(attn)
        return self.post_feedforward_layernorm(self.mlp(hidden)), hidden


class Olmo2ForCausalLM(LlamaForCausalLM):
    """Llama's forward loop, pipeline stages and weight loading with OLMo 2's layers."""

    def make_layer(self, config, ctx: ModelContext, rotary: RotaryEmbedding,
                   index: int) -> nn.Module:
        return Olmo2DecoderLayer(config, ctx, rotary, self.layer_window(config, index))

    def output_summed(self, config) -> bool:
        return True  # down_proj sums (post_feedforward_layernorm needs whole rows)

    def mlp_bias(self, config) -> bool:
        return False

    def layer_window(self, config, index: int) -> Optional[int]:
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names; each ``q_norm`` / ``k_norm`` weight is cut to this rank's heads."""
        return super().load_weights(local_qk_norm_weights(self, weights))
