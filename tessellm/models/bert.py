"""Encoder-only BERT-family models for embeddings and cross-encoder reranking: ``BertModel``
(all-MiniLM, bge, e5), ``XLMRobertaModel`` / ``RobertaModel`` (bge-m3, multilingual-e5), and
their ``*ForSequenceClassification`` (cross-encoders: ms-marco-MiniLM, bge-reranker).

One layer is post-LN, every projection has a bias::

    x -> qkv -> attention (bidirectional) -> dense -> LN(. + x) = h
      -> intermediate.dense -> act -> output.dense -> LN(. + h)

The embeddings are word + absolute position + token type, then a LayerNorm. Positions are the
runner's (0-based, one sequence a step), except RoBERTa's, which HF counts from ``padding_idx
+ 1`` and skips over pad tokens (``create_position_ids_from_input_ids``)::

    ids        CLS  a  PAD  b         (padding_idx 1)
    positions    2  3    1  4

Attention sees the whole sequence both ways: the paged kernel with key limits (plugin API 8,
``AttentionSpec.prefill_key_limits``), every row's limit being its sequence's last key
(``tessellm.pooling.encoder``). That needs each sequence whole in one step: the engine runs
these models without chunked prefill and without prefix caching.

Token types (BERT's segment ids): 0 for a single text; a cross-encoder's pair ``[CLS] q [SEP]
d [SEP]`` has 1 on every token after its first ``[SEP]``, as the tokenizer gives them. The
runner passes token ids only, so a BERT classifier with ``type_vocab_size > 1`` derives them
that way (the tokenizer's ``sep_token_id``, ``bert_token_types``); an embedding model uses 0.

The classifier heads run in float32 on the pooled first token (CLS pooling): BERT's is
``classifier(tanh(pooler.dense(x)))``, RoBERTa's ``out_proj(tanh(dense(x)))``.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.layers.activation import activation
from tessellm.layers.attention import Attention
from tessellm.layers.context import ModelContext
from tessellm.layers.layer_norm import LayerNorm
from tessellm.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear, materialize
from tessellm.layers.vocab import VocabParallelEmbedding
from tessellm.models.llama import _copy

_PREFIXES = ("bert.", "roberta.", "model.")  # a classifier's (or a wrapper's) base-model prefix
# Tensors HF saves that are not parameters here: buffers and heads this engine never runs.
_SKIP = ("embeddings.position_ids", "embeddings.token_type_ids", "cls.", "lm_head.")
_QKV = {"query": 0, "key": 1, "value": 2}


def sequence_count(flags: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per row, how many rows of its sequence up to and including it have ``flags`` set; each
    sequence whole in the step, its rows at positions 0, 1, ... (the encoder's invariant)::

        positions  0 1 2 3 0 1 2
        flags      1 0 1 1 0 1 1
        count      1 1 2 3 0 1 2
    """
    flags = flags.to(torch.int64)
    cum = torch.cumsum(flags, 0)
    rows = torch.arange(flags.shape[0], device=flags.device)
    start = (rows - positions.to(torch.int64)).clamp_(min=0)
    return cum - (cum - flags)[start]


class BertEmbeddings(nn.Module):
    def __init__(self, config, ctx: ModelContext, position_offset: Optional[int]):
        """``position_offset``: RoBERTa's ``padding_idx`` (positions count non-pad tokens from
        it + 1); None: the runner's positions."""
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, hidden, ctx.tp)
        self.position_embeddings = VocabParallelEmbedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = VocabParallelEmbedding(max(int(config.type_vocab_size), 1), hidden)
        self.LayerNorm = LayerNorm(hidden, config.layer_norm_eps, has_weight=True, has_bias=True)
        self.position_offset = position_offset

    def forward(self, input_ids, positions, token_types: Optional[torch.Tensor]):
        if self.position_offset is not None:
            real = input_ids != self.position_offset
            positions = sequence_count(real, positions) * real + self.position_offset
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_types is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_types)
        return self.LayerNorm(x)


class DenseLayerNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's ``*.output`` blocks (row-parallel dense)."""

    def __init__(self, config, ctx: ModelContext, input_size: int):
        super().__init__()
        self.dense = RowParallelLinear(input_size, config.hidden_size, bias=True,
                                       quant_method=ctx.quant_method, tp=ctx.tp)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, has_weight=True,
                                   has_bias=True)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class EncoderAttention(nn.Module):
    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        heads, hidden = config.num_attention_heads, config.hidden_size
        if heads % ctx.tp.size:
            raise ValueError(f"{heads} attention heads do not split over tensor_parallel_size "
                             f"{ctx.tp.size}; use a size that divides {heads}.")
        self.head_size = hidden // heads
        self.num_heads = heads // ctx.tp.size
        self.qkv = ColumnParallelLinear(hidden, [hidden] * 3, bias=True,
                                        quant_method=ctx.quant_method, tp=ctx.tp)
        kernel = ctx.make_attention_kernel(None, prefill_key_limits=True)
        self.attn = Attention(self.num_heads, self.num_heads, self.head_size,
                              self.head_size ** -0.5, kernel)
        self.output = DenseLayerNorm(config, ctx, hidden)

    def forward(self, hidden, metadata):
        q, k, v = self.qkv(hidden).chunk(3, dim=-1)
        return self.output(self.attn(q, k, v, metadata), hidden)


class Intermediate(nn.Module):
    def __init__(self, config, ctx: ModelContext, family: str):
        super().__init__()
        self.dense = ColumnParallelLinear(config.hidden_size, [config.intermediate_size],
                                          bias=True, quant_method=ctx.quant_method, tp=ctx.tp)
        self.act = activation(config.hidden_act, family)

    def forward(self, x):
        return self.act(self.dense(x))


class EncoderLayer(nn.Module):
    def __init__(self, config, ctx: ModelContext, family: str):
        super().__init__()
        self.attention = EncoderAttention(config, ctx)
        self.intermediate = Intermediate(config, ctx, family)
        self.output = DenseLayerNorm(config, ctx, config.intermediate_size)

    def forward(self, hidden, metadata):
        hidden = self.attention(hidden, metadata)
        return self.output(self.intermediate(hidden), hidden)


class Encoder(nn.Module):
    def __init__(self, config, ctx: ModelContext, family: str):
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(config, ctx, family)
                                   for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """The encoder; ``forward`` returns the last hidden states ``[T, hidden]`` (HF's
    ``last_hidden_state``), which the runner's pooler pools."""

    family = "BERT"
    bidirectional = True  # the runner gives key limits over whole sequences (pooling/encoder.py)
    default_pooling_type = "CLS"  # vLLM's default for these models without sentence-transformers files

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config = config
        self.check_config(config)
        self.embeddings = BertEmbeddings(config, ctx, self.position_offset(config))
        self.encoder = Encoder(config, ctx, self.family)
        # The tokenizer's [SEP] id when token types follow it (a BERT pair; bert_token_types).
        self.sep_token_id = self.pair_separator(config)

    @classmethod
    def pooling_type(cls, config) -> str:
        """The pooling without sentence-transformers files or a pooler config (the classifiers'
        heads read the first token)."""
        return cls.default_pooling_type

    def check_config(self, config) -> None:
        kind = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if kind != "absolute":
            raise ValueError(f"{self.family} position_embedding_type={kind!r} is not supported; "
                             "tessellm runs absolute position embeddings.")
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError(f"{self.family} as a decoder (is_decoder / add_cross_attention) is "
                             "not supported; tessellm runs it as an encoder (embeddings, scores).")

    def position_offset(self, config) -> Optional[int]:
        return None

    def pair_separator(self, config) -> Optional[int]:
        return None

    def attention_layers(self) -> list[Attention]:
        return [layer.attention.attn for layer in self.encoder.layer]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata,
                intermediate=None) -> torch.Tensor:
        types = None
        if self.sep_token_id is not None:  # 1 after the first [SEP] of the sequence
            seps = sequence_count(input_ids == self.sep_token_id, positions)
            types = (seps - (input_ids == self.sep_token_id).to(torch.int64)).clamp_(max=1)
        hidden = self.embeddings(input_ids, positions, types)
        for layer in self.encoder.layer:
            hidden = layer(hidden, metadata)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} is an encoder: it embeds or scores, it has no "
                         "LM head to generate with.")

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF-named tensors (``bert.`` / ``roberta.`` prefixes dropped; q, k, v into ``qkv``).
        Returns the names of the parameters filled."""
        loaded: set[str] = set()
        for name, tensor in weights:
            name = self.rename(name)
            if name is None:
                continue
            parts = name.split(".")
            if len(parts) > 3 and parts[-3] == "self" and parts[-2] in _QKV:  # attention.self.query
                module = self.get_submodule(".".join(parts[:-3]) + ".qkv")
                module.load_shard(parts[-1], tensor, _QKV[parts[-2]])
                loaded.add(".".join(parts[:-3]) + ".qkv." + parts[-1])
                continue
            load_named(self, name, tensor)
            loaded.add(name)
        return loaded

    def rename(self, name: str) -> Optional[str]:
        """Our name of a checkpoint tensor, or None to skip it (buffers, MLM heads, and the
        ``pooler`` an embedding model never runs)."""
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name.startswith(_SKIP) or name.startswith("pooler.") and not self.keeps_pooler:
            return None
        if name.endswith(".gamma") or name.endswith(".beta"):  # TF-era LayerNorm names
            name = name[:-len("gamma")] + "weight" if name.endswith(".gamma") else name[:-len("beta")] + "bias"
        return name

    keeps_pooler = False


def load_named(model: nn.Module, name: str, tensor, shards: int = 1) -> None:
    """Copy a checkpoint tensor into ``model``'s parameter of that name: a linear layer's (a
    fused one's ``shards`` logical weights stacked by rows, each loaded as its shard, so every
    tensor-parallel rank keeps its part of each), an embedding's, or any other's as it is."""
    module_name, leaf = name.rsplit(".", 1)
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"Checkpoint tensor {name} has no place in {type(model).__name__}; "
                         "is this the right architecture?") from None
    if isinstance(module, Linear) and shards > 1:
        for shard, piece in enumerate(materialize(tensor).chunk(shards, dim=0)):
            module.load_shard(leaf, piece, shard)
    elif isinstance(module, Linear):
        module.load_shard(leaf, tensor, None)
    elif isinstance(module, VocabParallelEmbedding):
        module.load_weight(tensor)
    else:
        _copy(getattr(module, leaf), materialize(tensor), name)


class RobertaModel(BertModel):
    """XLM-RoBERTa / RoBERTa: BERT's encoder with positions counted from ``padding_idx + 1``."""

    family = "XLM-RoBERTa"

    def position_offset(self, config) -> Optional[int]:
        return int(config.pad_token_id)


def _num_labels(model, config) -> int:
    n = int(getattr(config, "num_labels", 0) or 0)
    if n < 1:
        raise ValueError(f"{type(model).__name__} needs num_labels >= 1 in config.json, got {n}.")
    return n


class BertForSequenceClassification(BertModel):
    """A cross-encoder: ``classifier(tanh(pooler.dense(h[CLS])))``, float32."""

    keeps_pooler = True

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        hidden, n = config.hidden_size, _num_labels(self, config)
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(hidden, hidden, dtype=torch.float32)
        self.classifier = nn.Linear(hidden, n, dtype=torch.float32)

    def pair_separator(self, config) -> Optional[int]:
        sep = getattr(config, "sep_token_id", None)
        return int(sep) if int(getattr(config, "type_vocab_size", 1)) > 1 and sep is not None else None

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_labels] (float32) from the pooled first tokens [B, H]."""
        return self.classifier(torch.tanh(self.pooler.dense(pooled.float())))


class RobertaForSequenceClassification(RobertaModel):
    """A cross-encoder (bge-reranker): ``classifier.out_proj(tanh(classifier.dense(h[CLS])))``."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        hidden, n = config.hidden_size, _num_labels(self, config)
        self.classifier = nn.Module()
        self.classifier.dense = nn.Linear(hidden, hidden, dtype=torch.float32)
        self.classifier.out_proj = nn.Linear(hidden, n, dtype=torch.float32)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        head = self.classifier
        return head.out_proj(torch.tanh(head.dense(pooled.float())))
