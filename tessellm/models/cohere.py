"""Cohere (``CohereForCausalLM``: Command-R, Command-R+, Aya 23): the llama decoder's attention
and MLP in a parallel block, with what else differs from Llama:

- one LayerNorm (mean-subtracted, a weight, no bias; ``layer_norm_eps``) feeds both sublayers,
  whose outputs join the residual together (``parallel_block.py``)::

      h = h + attn(ln(h)) + mlp(ln(h))

  With ``attention_bias`` o_proj sums its output over the tensor ranks itself, so down_proj
  does too and the norms do not.
- rotary rotates interleaved pairs ``(x[2i], x[2i+1])`` (GPT-J style) where the backends rotate
  halves ``(x[i], x[i + d/2])`` (NeoX): q and k are reordered per head, evens then odds, before
  rotary (``interleaved_rotary.py``).
- ``use_qk_norm`` (Command-R+): q and k LayerNorm-ed per head, with a weight per head
  (``[heads, head_dim]``: each rank loads its heads' rows), before the reordering.
- ``logit_scale``: the logits are multiplied by it; embeddings are tied.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.context import ModelContext
from tessellm.layers.layer_norm import LayerNorm
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.decoder import DecoderAttention, DecoderMLP, shard_heads
from tessellm.models.interleaved_rotary import evens_then_odds
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.parallel_block import ParallelBlockLayer
from tessellm.models.qk_norm_weights import local_qk_norm_weights

class HeadLayerNorm(nn.Module):
    """LayerNorm over each head's dims with a weight per head: ``[T, heads * d]`` in and out;
    ``heads`` of the model's ``total_heads``, starting at ``first``, on this rank."""

    def __init__(self, heads: int, head_size: int, eps: float, first: int, total_heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, head_size), requires_grad=False)
        self.eps, self.first, self.total_heads = eps, first, total_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads, d = self.weight.shape
        y = F.layer_norm(x.float().view(-1, heads, d), (d,), eps=self.eps) * self.weight.float()
        return y.to(x.dtype).view(x.shape)

    def local(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """This rank's rows of the checkpoint's ``[total_heads, d]`` weight."""
        heads, d = self.weight.shape
        if tuple(tensor.shape) != (self.total_heads, d):
            raise ValueError(f"Checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected "
                             f"({self.total_heads}, {d}); the config does not match the weights.")
        return tensor[self.first:self.first + heads]


class CohereAttention(DecoderAttention):
    def __init__(self, config, ctx: ModelContext, rotary: Optional[RotaryEmbedding],
                 window: Optional[int] = None):
        """``rotary`` None: no rotation (Cohere 2's global layers); ``window``: the layer's
        sliding window (None: full attention)."""
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, ctx, rotary, qkv_bias=bias, qk_norm=False, o_bias=bias,
                         window=window)
        if getattr(config, "use_qk_norm", False):
            total = config.num_attention_heads
            total_kv = getattr(config, "num_key_value_heads", None) or total
            _, _, kv_first = shard_heads(total, total_kv, ctx.tp.rank, ctx.tp.size)
            d, eps = self.head_size, config.layer_norm_eps
            self.q_norm = HeadLayerNorm(self.num_heads, d, eps, ctx.tp.rank * self.num_heads, total)
            self.k_norm = HeadLayerNorm(self.num_kv_heads, d, eps, kv_first, total_kv)

    def local_norm_weight(self, which: str, tensor: torch.Tensor, name: str) -> torch.Tensor:
        norm = self.q_norm if which == "q" else self.k_norm
        if norm is None:
            raise ValueError(f"Checkpoint tensor {name!r} has no place in CohereForCausalLM as "
                             "configured; does the config's use_qk_norm match the weights?")
        return norm.local(tensor, name)

    def norm_qk(self, q, k):
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is None:  # nothing to rotate, so nothing to reorder
            return q, k
        d = self.head_size
        return evens_then_odds(q, d, d), evens_then_odds(k, d, d)


class CohereForCausalLM(LlamaForCausalLM):
    def __init__(self, config, ctx: ModelContext):
        scale = getattr(config, "logit_scale", None)
        number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
        if not number or not math.isfinite(scale):
            raise ValueError(f"Cohere config logit_scale={scale!r} is not supported: it must be a "
                             "finite number (Command-R's is 0.0625).")
        super().__init__(config, ctx)
        self.logit_scale = float(scale)

    def make_layer(self, config, ctx: ModelContext, rotary: RotaryEmbedding,
                   index: int) -> nn.Module:
        summed = self.output_summed(config)
        attention = CohereAttention(config, ctx, rotary if self.rotates(config, index) else None,
                                    self.layer_window(config, index))
        return ParallelBlockLayer(ctx, index, attention,
                                  DecoderMLP(config, ctx, reduce_output=summed),
                                  lambda reduce: self.make_norm(config, ctx, reduce), summed)

    def rotates(self, config, index: int) -> bool:
        """Whether layer ``index`` rotates q and k (Cohere: every layer)."""
        return True

    def make_norm(self, config, ctx: ModelContext, reduce: Optional[TensorParallel]) -> nn.Module:
        return LayerNorm(config.hidden_size, config.layer_norm_eps, reduce=reduce, has_weight=True)

    def output_summed(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))  # o_proj, then down_proj, sum

    def mlp_bias(self, config) -> bool:
        return False

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        return logits if self.logit_scale == 1.0 else logits * self.logit_scale

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names; each q/k norm weight is cut to this rank's heads."""
        return super().load_weights(local_qk_norm_weights(self, weights))
