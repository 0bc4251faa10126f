"""ModernBERT (``ModernBertModel``: gte-modernbert, nomic's and Alibaba's ModernBERT embedders;
``ModernBertForSequenceClassification``: ModernBERT rerankers), an encoder on the paged engine
like ``models/bert.py`` (bidirectional attention through key limits, whole prompts a step), but
pre-LN with rotary positions and a gated MLP, and no biases by default::

    tok_embeddings -> norm
    layer i:  x + Wo(attn(rotary(Wqkv(attn_norm(x)))))      (layer 0: no attn_norm)
              x + Wo(act(in) * gate), [in | gate] = Wi(mlp_norm(x))
    final_norm

Layers alternate per ``config.layer_types`` (every ``global_attn_every_n_layers``-th global):
``full_attention`` sees the whole sequence (rope ``rope_parameters["full_attention"]``, theta
160000), ``sliding_attention`` the tokens at most ``local_attention // 2`` away on either side
(its own rope, theta 10000), served by ``layers/symmetric_window.py``.

The classifier pools as ``classifier_pooling`` says (``cls`` or ``mean``; the pooler config),
then ``classifier(norm(act(head.dense(x))))`` in float32.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.layers.activation import activation
from tessellm.layers.attention import Attention
from tessellm.layers.context import ModelContext
from tessellm.layers.layer_norm import LayerNorm
from tessellm.layers.linear import ColumnParallelLinear, RowParallelLinear
from tessellm.layers.rope_config import rope_parameters
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.layers.vocab import VocabParallelEmbedding
from tessellm.models.bert import load_named

_SKIP = ("head.", "decoder.")  # the masked-LM head (ModernBertForMaskedLM), never run here


def _norm(config, hidden: Optional[int] = None) -> LayerNorm:
    return LayerNorm(hidden or config.hidden_size, config.norm_eps, has_weight=True,
                     has_bias=bool(getattr(config, "norm_bias", False)))


class ModernBertAttention(nn.Module):
    def __init__(self, config, ctx: ModelContext, layer_type: str):
        super().__init__()
        heads, hidden = config.num_attention_heads, config.hidden_size
        if heads % ctx.tp.size:
            raise ValueError(f"{heads} attention heads do not split over tensor_parallel_size "
                             f"{ctx.tp.size}; use a size that divides {heads}.")
        d = hidden // heads
        self.num_heads = heads // ctx.tp.size
        bias = bool(getattr(config, "attention_bias", False))
        self.Wqkv = ColumnParallelLinear(hidden, [hidden] * 3, bias=bias,
                                         quant_method=ctx.quant_method, tp=ctx.tp)
        self.Wo = RowParallelLinear(hidden, hidden, bias=bias, quant_method=ctx.quant_method, tp=ctx.tp)
        if layer_type == "sliding_attention":
            half = int(config.local_attention) // 2  # |query - key| <= half, HF's mask
            kernel = ctx.make_attention_kernel(half + 1, key_window=half, prefill_key_limits=True)
        elif layer_type == "full_attention":
            kernel = ctx.make_attention_kernel(None, prefill_key_limits=True)
        else:
            raise ValueError(f"ModernBERT layer type {layer_type!r} is not supported; "
                             "full_attention and sliding_attention are.")
        self.attn = Attention(self.num_heads, self.num_heads, d, d ** -0.5, kernel)
        self.rotary = RotaryEmbedding.from_config(config, d, ctx.ops, params=rope_parameters(
            config, layer_type), max_positions=ctx.max_positions)

    def forward(self, positions, hidden, metadata):
        q, k, v = self.Wqkv(hidden).chunk(3, dim=-1)
        q, k = self.rotary(positions, q, k)
        return self.Wo(self.attn(q, k, v, metadata))


class ModernBertMLP(nn.Module):
    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        bias, inter = bool(getattr(config, "mlp_bias", False)), int(config.intermediate_size)
        self.inter = inter // ctx.tp.size
        # [in | gate] rows: each split over the ranks on its own (ColumnParallelLinear's shards)
        self.Wi = ColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias,
                                       quant_method=ctx.quant_method, tp=ctx.tp)
        self.Wo = RowParallelLinear(inter, config.hidden_size, bias=bias,
                                    quant_method=ctx.quant_method, tp=ctx.tp)
        self.act = activation(config.hidden_activation, "ModernBERT")

    def forward(self, x):
        x, gate = self.Wi(x).split(self.inter, dim=-1)
        return self.Wo(self.act(x) * gate)


class ModernBertLayer(nn.Module):
    def __init__(self, config, ctx: ModelContext, index: int):
        super().__init__()
        self.attn_norm = _norm(config) if index else None
        self.attn = ModernBertAttention(config, ctx, config.layer_types[index])
        self.mlp_norm = _norm(config)
        self.mlp = ModernBertMLP(config, ctx)

    def forward(self, positions, hidden, metadata):
        x = hidden if self.attn_norm is None else self.attn_norm(hidden)
        hidden = hidden + self.attn(positions, x, metadata)
        return hidden + self.mlp(self.mlp_norm(hidden))


class ModernBertModel(nn.Module):
    """``forward`` returns HF's ``last_hidden_state`` (after ``final_norm``)."""

    bidirectional = True  # key limits over whole sequences (pooling/encoder.py)
    default_pooling_type = "CLS"

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config = config
        self.embeddings = nn.Module()
        self.embeddings.tok_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.tp)
        self.embeddings.norm = _norm(config)
        self.layers = nn.ModuleList(ModernBertLayer(config, ctx, i) for i in range(config.num_hidden_layers))
        self.final_norm = _norm(config)

    @classmethod
    def pooling_type(cls, config) -> str:
        return cls.default_pooling_type

    def attention_layers(self) -> list[Attention]:
        return [layer.attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata,
                intermediate=None) -> torch.Tensor:
        hidden = self.embeddings.norm(self.embeddings.tok_embeddings(input_ids))
        for layer in self.layers:
            hidden = layer(positions, hidden, metadata)
        return self.final_norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} is an encoder: it embeds or scores, it has no "
                         "LM head to generate with.")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names (the ``model.`` prefix of a classifier's base dropped; ``Wi`` is [in | gate]
        rows, loaded as two shards so each rank holds its part of both)."""
        loaded: set[str] = set()
        modules = dict(self.named_modules())
        for name, tensor in weights:
            name = name[len("model."):] if name.startswith("model.") else name
            if name.startswith(_SKIP) and not hasattr(self, name.split(".")[0]):
                continue
            module = modules.get(name.rsplit(".", 1)[0])
            fused = len(module.output_sizes) if isinstance(module, ColumnParallelLinear) else 1
            load_named(self, name, tensor, shards=fused)  # Wqkv: [q | k | v], Wi: [in | gate]
            loaded.add(name)
        return loaded


class ModernBertForSequenceClassification(ModernBertModel):
    """``classifier(head.norm(act(head.dense(pooled))))``, float32."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        hidden = config.hidden_size
        n = int(getattr(config, "num_labels", 0) or 0)
        if n < 1:
            raise ValueError(f"{type(self).__name__} needs num_labels >= 1 in config.json, got {n}.")
        bias = bool(getattr(config, "classifier_bias", False))
        self.head = nn.Module()
        self.head.dense = nn.Linear(hidden, hidden, bias=bias, dtype=torch.float32)
        self.head.norm = _norm(config).float()
        self.head.act = activation(config.classifier_activation, "ModernBERT")
        self.classifier = nn.Linear(hidden, n, dtype=torch.float32)

    @classmethod
    def pooling_type(cls, config) -> str:
        kind = getattr(config, "classifier_pooling", "cls")
        if kind not in ("cls", "mean"):
            raise ValueError(f"ModernBERT classifier_pooling {kind!r} is not supported; cls and mean are.")
        return kind.upper()

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        head = self.head
        return self.classifier(head.norm(head.act(head.dense(pooled.float()))))
