"""The llama family: Llama 2/3/3.1/3.2, SmolLM2, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

One decoder definition (its layers in ``decoder.py``); the differences are config switches and
the per-family hooks of ``LlamaForCausalLM``. Tokens are flat (no batch dim): ``input_ids``
and ``positions`` are ``[num_tokens]``.

Parallelism comes in through the ModelContext (``ctx.tp``, ``ctx.pp``): attention heads, the
MLP's intermediate rows and the vocabulary are split over the tensor-parallel group, and each
pipeline stage builds only its own layers (the others are ``MissingLayer`` placeholders, so
parameter names stay those of the checkpoint). A stage that is not the last returns
``(hidden, residual)`` for the next one.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm import envs
from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.attention import Attention
from tessellm.layers.context import ModelContext
from tessellm.layers.linear import NormFold, materialize
from tessellm.layers.norm import RMSNorm
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from tessellm.models.decoder import (DecoderLayer, DecoderMLP, link_norm_epilogues,
                                     link_norm_folds)
from tessellm.models.layer_windows import window_by_layer_type, window_everywhere
from tessellm.models.micro_batches import MicroBatches


class LlamaForCausalLM(nn.Module):
    """Per-family switches are the class attributes and the ``*_bias`` / ``layer_window``
    methods below (each subclass states what its HF modeling file does)."""

    qk_norm = False
    embedding_multiplier = 1.0  # Granite: the embeddings are scaled by it
    lm_head_bias = False  # Phi: the LM head adds a bias (``lm_head.bias``)

    # checkpoint name fragment -> (our fused param fragment, shard index)
    stacked_params = (
        (".q_proj.", ".qkv_proj.", 0), (".k_proj.", ".qkv_proj.", 1), (".v_proj.", ".qkv_proj.", 2),
        (".gate_proj.", ".gate_up_proj.", 0), (".up_proj.", ".gate_up_proj.", 1),
    )

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config = config
        self.pp = ctx.pp
        vocab, hidden = config.vocab_size, config.hidden_size
        self.start_layer, self.end_layer = ctx.pp.layer_range(config.num_hidden_layers)
        # Speculative decoding (EAGLE-3) sets layer indices whose inputs each forward keeps in
        # ``aux_hidden_states`` (once, at start-up); empty: none kept.
        self.aux_hidden_layers: tuple[int, ...] = ()
        self.aux_hidden_states: list[torch.Tensor] = []
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if ctx.pp.is_first:
            self.embed_tokens = VocabParallelEmbedding(vocab, hidden, ctx.tp)
        self.check_config(config)
        heads = config.num_attention_heads
        head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
        rotary = self.make_rotary(config, head_size, ctx)
        self.layers = nn.ModuleList(
            self.make_layer(config, ctx, rotary, i)
            if self.start_layer <= i < self.end_layer else MissingLayer()
            for i in range(config.num_hidden_layers))
        if ctx.pp.is_last:  # the last layer's output summed, unless it is already
            self.norm = self.make_norm(config, ctx, None if self.output_summed(config) else ctx.tp)
            tied = self.embed_tokens.weight if self.tie_word_embeddings and ctx.pp.is_first else None
            self.lm_head = ParallelLMHead(vocab, hidden, ctx.tp, weight=tied,
                                          bias=self.lm_head_bias)
        # batch 1: down_proj runs the next norm (decoder.py), where this forward runs the layers
        if envs.gemv_norm_epilogue() and type(self).forward is LlamaForCausalLM.forward:
            link_norm_epilogues(self.layers, self.start_layer, self.end_layer,
                                self.norm if ctx.pp.is_last else None)
        # batch 1: down_proj runs half the next layer's input norm (decoder.link_norm_folds)
        if type(self).forward is LlamaForCausalLM.forward:  # layers on the fold path only
            link_norm_folds(self.layers, self.start_layer, self.end_layer)

    def make_layer(self, config, ctx: ModelContext, rotary: RotaryEmbedding,
                   index: int) -> nn.Module:
        """Decoder layer ``index``: returns ``(hidden, residual)`` whose sum is the residual
        stream, ``hidden`` a partial sum under tensor parallelism unless ``output_summed``."""
        qkv_bias, o_bias = self.attention_biases(config)
        return DecoderLayer(config, ctx, rotary, qkv_bias, self.qk_norm, index,
                            self.make_mlp(config, ctx, index), o_bias=o_bias,
                            window=self.layer_window(config, index),
                            input_summed=self.output_summed(config),
                            scale=self.attention_scale(config),
                            residual_multiplier=self.residual_multiplier(config),
                            clip_qkv=self.clip_qkv(config),
                            norm=lambda reduce: self.make_norm(config, ctx, reduce),
                            attention=self.make_attention(config, ctx, rotary, index))

    def make_attention(self, config, ctx: ModelContext, rotary, index: int) -> Optional[nn.Module]:
        """Layer ``index``'s attention when the family builds its own; None: ``DecoderLayer``
        builds a ``DecoderAttention`` from the switches below."""
        return None

    def make_rotary(self, config, head_size: int, ctx: ModelContext):
        """The rotary embedding every ``make_layer`` call receives (built once, shared)."""
        return RotaryEmbedding.from_config(config, head_size, ctx.ops,
                                           max_positions=ctx.max_positions)

    def make_norm(self, config, ctx: ModelContext, reduce: Optional[TensorParallel]) -> nn.Module:
        """A norm of the hidden states (each layer's two, the final one), summing its input
        over ``reduce`` when set."""
        return RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.ops, reduce=reduce)

    def output_summed(self, config) -> bool:
        """Whether a layer's output is summed over the tensor ranks already (down_proj with a
        bias sums there), so the next norm must not sum it again."""
        return self.mlp_bias(config)

    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        """Layer ``index``'s MLP (the MoE families override it); its output is a partial sum
        under tensor parallelism, summed by the next RMSNorm (unless it has a bias)."""
        return DecoderMLP(config, ctx, bias=self.mlp_bias(config))

    # -- per-family config (what the family's HF modeling file reads) -----------------------

    def attention_biases(self, config) -> tuple[bool, bool]:
        """(q/k/v bias, o_proj bias). Llama, Qwen3: both ``attention_bias``."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def mlp_bias(self, config) -> bool:
        return bool(getattr(config, "mlp_bias", False))

    def layer_window(self, config, index: int) -> Optional[int]:
        """Layer ``index``'s sliding window; None: full attention. Llama has none."""
        return None

    def attention_scale(self, config) -> Optional[float]:
        """The attention scores' scale; None: ``head_dim ** -0.5``."""
        return None

    def residual_multiplier(self, config) -> float:
        """What the attention and MLP outputs are scaled by before the residual add."""
        return 1.0

    def clip_qkv(self, config) -> Optional[float]:
        """The clamp on q, k and v after the projection; None: none."""
        return None

    def check_config(self, config) -> None:
        """Refuses, at load, config values this family's code does not implement."""

    def attention_layers(self) -> list[Attention]:
        """This stage's attention layers (the ones that hold KV cache)."""
        return [self.layers[i].self_attn.attn for i in range(self.start_layer, self.end_layer)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata,
                intermediate: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                inputs_embeds: Optional[torch.Tensor] = None):
        """The first stage embeds ``input_ids`` (or takes ``inputs_embeds``: a multimodal
        model's, with image features at its placeholders); later ones continue from
        ``intermediate`` (the previous stage's ``(hidden, residual)``). The last stage returns
        the normed hidden states, the others ``(hidden, residual)``."""
        if self.pp.is_first:
            embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            if self.embedding_multiplier != 1.0:
                embeds = embeds * self.embedding_multiplier
            hidden, residual = self.embed_positions(embeds, positions), None
        else:
            hidden, residual = intermediate
        aux = self.aux_hidden_layers
        if aux:  # EAGLE-3: the residual stream entering these layers (tessellm.spec_decode)
            self.aux_hidden_states = []
        if isinstance(metadata, MicroBatches):  # a split decode step (core/decode_overlap.py)
            hidden, residual = metadata.run_layers(self.layers[self.start_layer:self.end_layer],
                                                   positions, hidden, residual)
        else:
            for i in range(self.start_layer, self.end_layer):
                if aux and i in aux:
                    self.aux_hidden_states.append(self._stream_into(i, hidden, residual))
                hidden, residual = self.layers[i](positions, hidden, residual, metadata)
        if not self.pp.is_last:
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def _stream_into(self, i: int, hidden: torch.Tensor, residual) -> torch.Tensor:
        """The residual stream entering layer ``i`` (EAGLE-3 reads it), whole on every rank:
        under tensor parallelism ``hidden`` is a partial sum that layer ``i``'s input norm
        reduces, so it is summed here too, on a copy (the norm sums the original)."""
        if residual is None:
            return hidden
        if isinstance(hidden, NormFold):  # layer i - 1 added its output into it already
            return residual.clone()
        handoff = getattr(self.layers[i].input_layernorm, "_handoff", None)
        if handoff is not None and handoff[0] is hidden and handoff[1] is residual:
            return residual.clone()  # layer i - 1 added its output into it (hand_off)
        reduce = getattr(self.layers[i].input_layernorm, "reduce", None)
        return (hidden if reduce is None else reduce.all_reduce(hidden.clone())) + residual

    def embed_positions(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The first layer's input from the token embeddings: GPT-BigCode adds its learned
        position embeddings; the rotary families take them as they are."""
        return embeds

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # -- weights ---------------------------------------------------------------------------

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors under the llama names ``load_weights`` and the quantized
        loader (``quantization/loading.py``) route by: a family whose checkpoint names differ
        (GPT-NeoX, GPT-BigCode, EXAONE) renames them, and cuts fused tensors, here. Both
        loaders call it, so names already in llama form must pass unchanged."""
        return weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors. Returns the names of the parameters that were filled."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        shards: dict[str, set] = {}  # fused parameter -> the shards the checkpoint filled
        for name, tensor in self.checkpoint_names(weights):
            name = _strip_prefix(name)
            if name is None or not self._owns(name):
                continue
            if name == "embed_tokens.weight" or name == "lm_head.weight":
                if name == "lm_head.weight" and self.tie_word_embeddings:
                    continue
                if name == "embed_tokens.weight" and self.pp.is_first:
                    self.embed_tokens.load_weight(tensor)
                    loaded.add(name)
                if self.pp.is_last and self.lm_head.tied is None and (
                        name == "lm_head.weight" or self.tie_word_embeddings):
                    self.lm_head.load_weight(tensor)
                    loaded.add("lm_head.weight")
                continue
            for ckpt_part, our_part, shard in self.stacked_params:
                if ckpt_part in name:
                    fused = name.replace(ckpt_part, our_part)
                    if fused not in params:  # e.g. a q_proj.bias the config says is absent
                        raise ValueError(f"Checkpoint tensor {name!r} has no place in "
                                         f"{type(self).__name__} as configured; does the config "
                                         "(attention_bias, mlp_bias, ...) match the weights?")
                    module_name, _, attr = fused.rpartition(".")
                    modules[module_name].load_shard(attr, tensor, shard)
                    loaded.add(fused)
                    shards.setdefault(fused, set()).add(shard)
                    break
            else:
                if name.endswith((".o_proj.weight", ".down_proj.weight", ".o_proj.bias")):
                    module_name, _, attr = name.rpartition(".")
                    modules[module_name].load_shard(attr, tensor, None)
                elif name in params:
                    _copy(params[name], materialize(tensor), name)
                else:
                    raise ValueError(f"Checkpoint tensor {name!r} has no place in "
                                     f"{type(self).__name__}; is this the right architecture?")
                loaded.add(name)
        self._check_shards(shards)
        return loaded

    def _check_shards(self, shards: dict[str, set]) -> None:
        """A fused parameter is filled from several checkpoint tensors (q/k/v, gate/up): each
        of them must have been there, or part of it would stay uninitialised."""
        for fused, seen in shards.items():
            for ckpt_part, our_part, shard in self.stacked_params:
                if our_part in fused and shard not in seen:
                    raise ValueError(f"The checkpoint has no {fused.replace(our_part, ckpt_part)!r}"
                                     f" (the other parts of {fused} are there); is it complete?")


    def _owns(self, name: str) -> bool:
        """Whether this pipeline stage holds the checkpoint tensor ``name``."""
        if name.startswith("layers."):
            return self.start_layer <= int(name.split(".", 2)[1]) < self.end_layer
        if name.startswith("norm.") or name == "lm_head.bias":
            return self.pp.is_last
        return True  # embed_tokens / lm_head.weight (tied or not): sorted out by the caller


class MissingLayer(nn.Module):
    """Stands in for a decoder layer that another pipeline stage runs."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("This decoder layer belongs to another pipeline stage.")


def _strip_prefix(name: str) -> Optional[str]:
    """HF names: 'model.layers.0...' -> 'layers.0...'; drop buffers we compute ourselves."""
    if "rotary_emb.inv_freq" in name:
        return None
    if name.startswith("model."):
        return name[len("model."):]
    return name


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"Checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected "
                         f"{tuple(param.shape)}; the config does not match the weights.")
    param.data.copy_(tensor)


class MistralForCausalLM(LlamaForCausalLM):
    """No biases; ``sliding_window`` on every layer (Phi-3 shares these switches)."""

    def attention_biases(self, config) -> tuple[bool, bool]:
        return False, False

    def mlp_bias(self, config) -> bool:
        return False

    def layer_window(self, config, index: int) -> Optional[int]:
        return window_everywhere(config)


class Qwen2ForCausalLM(LlamaForCausalLM):
    def attention_biases(self, config) -> tuple[bool, bool]:
        return True, False

    def mlp_bias(self, config) -> bool:
        return False

    def layer_window(self, config, index: int) -> Optional[int]:
        return window_by_layer_type(config, index)


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True

    def mlp_bias(self, config) -> bool:
        return False

    def layer_window(self, config, index: int) -> Optional[int]:
        return window_by_layer_type(config, index)
