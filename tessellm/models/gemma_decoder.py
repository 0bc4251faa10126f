"""What the Gemma families share (``gemma.py``, ``gemma2.py``, ``gemma3.py``), and the
"sandwich" decoder of Gemma 2 and Gemma 3.

Every Gemma:

- scales the embeddings by ``sqrt(hidden_size)``, rounded to the model dtype as HF does
  (``embed_scale``);
- multiplies each RMSNorm by ``(1 + w)``: the checkpoint's ``w`` loads as ``1 + w``
  (``shifted_norms``) so the backend's plain ``rms_norm`` applies it;
- has a GeGLU MLP, ``gelu_tanh(gate) * up`` (``GemmaMLP``).

Gemma 2 and 3 (``GemmaSandwichForCausalLM``) add four norms per layer: the attention and MLP
outputs are normed before the residual add, which fits the fused residual-add norm like this::

    h, res = input_layernorm(m, res)          # m: previous layer's output (res = m at layer 0)
    a = post_attention_layernorm(attn(h))
    h, res = pre_feedforward_layernorm(a, res)
    m = post_feedforward_layernorm(mlp(h))

and: attention scaled by ``query_pre_attn_scalar ** -0.5``; layers ``sliding_attention``
(window ``sliding_window``) or ``full_attention`` (one attention kernel per window); optional
attention logit soft-capping (``attn_logit_softcapping``, Gemma 2: 50, applied by the kernel,
``AttentionSpec.logit_softcap``) and final logit soft-capping (``final_logit_softcapping``,
Gemma 2: 30), each ``cap * tanh(x / cap)``. Under tensor parallelism o_proj and down_proj sum
their outputs (the post norms need whole rows), so the norms here never reduce.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.layers.context import ModelContext
from tessellm.layers.linear import ColumnParallelLinear, RowParallelLinear, materialize
from tessellm.layers.norm import RMSNorm, add_and_norm
from tessellm.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from tessellm.models.decoder import DecoderAttention
from tessellm.models.llama import LlamaForCausalLM, MissingLayer

SLIDING = "sliding_attention"
FULL = "full_attention"
# HF activation names of the tanh-approximated GELU (``gelu_pytorch_tanh`` in every Gemma config)
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def embed_scale(hidden_size: int, dtype: torch.dtype) -> float:
    """``sqrt(hidden_size)`` rounded to ``dtype``, as HF's Gemma models multiply by it."""
    return float(torch.tensor(hidden_size ** 0.5).to(dtype))


def shifted_norms(weights: Iterable[tuple[str, torch.Tensor]]):
    """HF-named tensors with every ``*norm.weight`` ``w`` replaced by ``1 + w``."""
    for name, tensor in weights:
        if name.endswith("norm.weight"):
            tensor = materialize(tensor) + 1
        yield name, tensor


class GemmaMLP(nn.Module):
    """GeGLU: ``down_proj(gelu(gate) * up)``, tanh-approximated GELU unless ``approximate`` is
    "none". ``reduce_output``: down_proj sums its output over the tensor ranks itself."""

    def __init__(self, config, ctx: ModelContext, approximate: str = "tanh",
                 reduce_output: bool = True):
        super().__init__()
        inter = config.intermediate_size
        self.inter = inter // ctx.tp.size
        self.approximate = approximate
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [inter, inter],
                                                 quant_method=ctx.quant_method, tp=ctx.tp)
        self.down_proj = RowParallelLinear(inter, config.hidden_size,
                                           quant_method=ctx.quant_method, tp=ctx.tp,
                                           reduce_results=reduce_output)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)
        return self.down_proj(F.gelu(gate, approximate=self.approximate) * up)


def check_gelu_tanh(config, family: str, field: str = "hidden_activation") -> None:
    act = getattr(config, field, None) or "gelu_pytorch_tanh"
    if act not in GELU_TANH:
        raise ValueError(f"{family} {field} {act!r} is not supported; only gelu_pytorch_tanh is.")


class SandwichDecoderLayer(nn.Module):
    """Pre- and post-norms around attention and MLP (module docstring)."""

    def __init__(self, config, ctx: ModelContext, attention: nn.Module):
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.self_attn = attention
        self.mlp = GemmaMLP(config, ctx)
        self.input_layernorm = RMSNorm(hidden, eps, ctx.ops)
        self.post_attention_layernorm = RMSNorm(hidden, eps, ctx.ops)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, ctx.ops)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, ctx.ops)

    def forward(self, positions, hidden, residual, metadata):
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, metadata))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaSandwichForCausalLM(LlamaForCausalLM):
    """Gemma 2 and 3: the llama family's forward loop, pipeline stages and weight loading, the
    sandwich layers, the embedding scale, ``1 + w`` norms and both soft-caps. A subclass names its
    ``family``, says whether q and k are RMS-normed per head (``qk_norm``), and gives
    ``layer_kinds`` and ``make_rotaries``."""

    family = "Gemma"

    def __init__(self, config, ctx: ModelContext):
        nn.Module.__init__(self)
        self.check_config(config)
        self.config = config
        self.pp = ctx.pp
        vocab, hidden = config.vocab_size, config.hidden_size
        self.start_layer, self.end_layer = ctx.pp.layer_range(config.num_hidden_layers)
        self.aux_hidden_layers: tuple[int, ...] = ()  # llama's forward loop runs the layers
        self.aux_hidden_states: list[torch.Tensor] = []
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.embedding_multiplier = embed_scale(hidden, ctx.dtype)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        if ctx.pp.is_first:
            self.embed_tokens = VocabParallelEmbedding(vocab, hidden, ctx.tp)
        kinds = self.layer_kinds(config)
        rotaries = self.make_rotaries(config, set(kinds), ctx)
        self.layers = nn.ModuleList(
            SandwichDecoderLayer(config, ctx, self.make_kind_attention(config, ctx, rotaries, kind))
            if self.start_layer <= i < self.end_layer else MissingLayer()
            for i, kind in enumerate(kinds))
        if ctx.pp.is_last:
            self.norm = RMSNorm(hidden, config.rms_norm_eps, ctx.ops)
            tied = self.embed_tokens.weight if self.tie_word_embeddings and ctx.pp.is_first else None
            self.lm_head = ParallelLMHead(vocab, hidden, ctx.tp, weight=tied)

    def make_kind_attention(self, config, ctx: ModelContext, rotaries: dict,
                            kind: str) -> nn.Module:
        """A ``kind`` layer's attention (its window, its rotary), soft-capped when the config
        says so (by the attention kernel)."""
        bias = bool(getattr(config, "attention_bias", False))
        window = config.sliding_window if kind == SLIDING else None
        return DecoderAttention(config, ctx, rotaries[kind], qkv_bias=bias,
                                qk_norm=self.qk_norm, o_bias=bias, window=window, reduce_output=True,
                                scale=config.query_pre_attn_scalar ** -0.5,
                                logit_softcap=getattr(config, "attn_logit_softcapping", None))

    def layer_kinds(self, config) -> list[str]:
        """Each layer's kind, ``SLIDING`` or ``FULL``."""
        raise NotImplementedError

    def make_rotaries(self, config, kinds: set[str], ctx: ModelContext) -> dict:
        """kind -> the rotary embedding of that kind's layers."""
        raise NotImplementedError

    def check_config(self, config) -> None:
        """Refuses the variants this implementation would run wrongly."""
        check_gelu_tanh(config, self.family)
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(f"{self.family} use_bidirectional_attention=True (an embedding "
                             "model) is not supported; tessellm serves causal language models "
                             "only.")
        kinds = set(self.layer_kinds(config)) - {SLIDING, FULL}
        if kinds:
            raise ValueError(f"{self.family} config.layer_types {sorted(kinds)} are not "
                             "supported; supported: sliding_attention, full_attention.")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names; every ``*norm.weight`` ``w`` loads as ``1 + w``."""
        return super().load_weights(shifted_norms(weights))


def kinds_from_pattern(config, sliding: Callable[[int], bool]) -> list[str]:
    """``config.layer_types`` when set, else ``SLIDING`` where ``sliding(i)`` (configs of
    transformers versions before ``layer_types``)."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    return [SLIDING if sliding(i) else FULL for i in range(config.num_hidden_layers)]
