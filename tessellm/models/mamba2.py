"""Mamba2 (``Mamba2ForCausalLM``: Mamba-Codestral-7B, mamba2-130m ... 2.7b): attention-free,
every layer a Mamba2 mixer (``layers/mamba_mixer.py``) behind an RMSNorm::

    h = embeddings(ids)
    per layer:  h = h + mixer(norm(h))
    logits = lm_head(norm_f(h))

Checkpoint names are HF's: ``backbone.embeddings``, ``backbone.layers.{i}.norm``,
``backbone.layers.{i}.mixer.{in_proj, conv1d, dt_bias, A_log, D, norm, out_proj}``,
``backbone.norm_f``, ``lm_head``. The model has no attention layer: it keeps no KV cache
(block ids are bookkeeping only), only the per-request state cache. Nemotron-H
(``nemotron_h.py``) is the same stack with other mixers in some layers.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.linear import materialize
from tessellm.layers.mamba_mixer import MambaMixer2, MambaShape
from tessellm.layers.norm import RMSNorm, add_and_norm
from tessellm.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from tessellm.models.decoder import DecoderAttention
from tessellm.models.llama import MissingLayer
from tessellm.models.state_space import check_time_step_limit


def mamba2_shape(config) -> MambaShape:
    return MambaShape(hidden_size=config.hidden_size, num_heads=config.num_heads,
                      head_dim=config.head_dim, n_groups=config.n_groups, d_state=config.state_size,
                      d_conv=config.conv_kernel, chunk_size=config.chunk_size,
                      proj_bias=bool(config.use_bias), conv_bias=bool(config.use_conv_bias),
                      eps=config.layer_norm_epsilon,
                      dt_limit=check_time_step_limit(getattr(config, "time_step_limit", None)))


class MixerBlock(nn.Module):
    """One pre-norm residual block around one mixer: ``h = h + mixer(norm(h))`` (the add fused
    into the next block's norm). The mixer is a Mamba2 mixer, or in Nemotron-H also attention
    (a ``DecoderAttention``), an MLP or an MoE; each sums its own output under tensor
    parallelism, so the norms never reduce."""

    def __init__(self, norm: nn.Module, mixer: nn.Module):
        super().__init__()
        self.norm = norm
        self.mixer = mixer
        self.attends = isinstance(mixer, DecoderAttention)

    def forward(self, positions, hidden, residual, metadata):
        hidden, residual = add_and_norm(self.norm, hidden, residual)
        if self.attends:
            return self.mixer(positions, hidden, metadata), residual
        return self.mixer(hidden), residual


class Mamba2ForCausalLM(nn.Module):
    """A stack of ``MixerBlock``s over ``backbone.*`` names; ``make_mixer`` says what each
    layer mixes with (here always Mamba2) and ``load_mixer_tensor`` where its tensors go."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.check_config(config)
        self.config = config
        self.pp = ctx.pp  # a stage builds its layers [start_layer, end_layer) (the others:
        self.start_layer, self.end_layer = ctx.pp.layer_range(config.num_hidden_layers)  # Missing)
        self.tie_word_embeddings = self.ties_embeddings(config)
        # EAGLE-3 (tessellm.spec_decode) sets layer indices whose inputs each forward keeps in
        # ``aux_hidden_states`` (once, at start-up); empty: none kept.
        self.aux_hidden_layers: tuple[int, ...] = ()
        self.aux_hidden_states: list[torch.Tensor] = []
        if ctx.pp.is_first:
            self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.tp)
        self.layers = nn.ModuleList(
            MixerBlock(RMSNorm(config.hidden_size, config.layer_norm_epsilon, ctx.ops),
                       self.make_mixer(config, ctx, i))
            if self.start_layer <= i < self.end_layer else MissingLayer()
            for i in range(config.num_hidden_layers))
        if ctx.pp.is_last:
            self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon, ctx.ops)
            tied = (self.embeddings.weight if self.tie_word_embeddings and ctx.pp.is_first
                    else None)  # tied on another stage: the last loads the embeddings' tensor
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx.tp,
                                          weight=tied)
        if not self.attention_layers():
            ctx.make_attention_kernel(None)  # the runner's step metadata; no layer attends

    def check_config(self, config) -> None:
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"Mamba2 hidden_act {config.hidden_act!r} is not supported; only silu is.")
        if config.num_heads * config.head_dim != int(config.expand * config.hidden_size):
            raise ValueError("Mamba2 config num_heads * head_dim must equal expand * hidden_size "
                             f"({config.num_heads} * {config.head_dim} vs {config.expand} * "
                             f"{config.hidden_size}); the config does not describe a Mamba2 mixer.")

    def ties_embeddings(self, config) -> bool:
        return bool(getattr(config, "tie_word_embeddings", False))

    def make_mixer(self, config, ctx: ModelContext, index: int) -> nn.Module:
        return MambaMixer2(mamba2_shape(config), ctx)

    def attention_layers(self) -> list:
        return [layer.mixer.attn for layer in self._blocks() if layer.attends]

    def mamba_layers(self) -> list[MambaMixer2]:
        return [layer.mixer for layer in self._blocks() if isinstance(layer.mixer, MambaMixer2)]

    def _owns_layer(self, name: str) -> bool:
        """Whether ``layers.{i}...`` is this stage's (an index past the layers is, so that it is
        refused naming the tensor)."""
        index = name.split(".", 2)[1]
        return not (index.isdigit() and int(index) < len(self.layers)
                    and isinstance(self.layers[int(index)], MissingLayer))

    def _blocks(self) -> list[MixerBlock]:
        """This pipeline stage's blocks."""
        return [layer for layer in self.layers if isinstance(layer, MixerBlock)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata,
                intermediate=None, inputs_embeds: Optional[torch.Tensor] = None):
        """The first stage embeds; later ones continue from ``intermediate`` (the previous
        stage's ``(hidden, residual)``); the last returns the normed hidden states, the others
        ``(hidden, residual)``."""
        if self.pp.is_first:
            hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
            residual = None
        else:
            hidden, residual = intermediate
        aux = self.aux_hidden_layers
        if aux:  # EAGLE-3: the residual stream entering these layers, whatever their mixer
            self.aux_hidden_states = []
        for i in range(self.start_layer, self.end_layer):
            if aux and i in aux:  # each mixer sums its own output: the stream is whole here
                self.aux_hidden_states.append(hidden if residual is None else hidden + residual)
            hidden, residual = self.layers[i](positions, hidden, residual, metadata)
        if not self.pp.is_last:
            return hidden, residual
        hidden, _ = self.norm_f(hidden, residual)
        return hidden

    @property
    def embed_tokens(self) -> nn.Module:
        """The embedding under the name draft heads read (EAGLE shares the target's)."""
        return self.embeddings

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_mixer_tensor(self, index: int, attr: str, tensor) -> str:
        """Layer ``index``'s checkpoint tensor ``mixer.<attr>`` (whole: the mixer takes this
        rank's slice); returns the name it reports as loaded."""
        self.layers[index].mixer.load_checkpoint_tensor(attr, tensor)
        return f"layers.{index}.mixer.{attr}"

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name[len("backbone."):] if name.startswith("backbone.") else name
            if name == "embeddings.weight":
                if self.pp.is_first:
                    self.embeddings.load_weight(tensor)
                if self.tie_word_embeddings and self.pp.is_last:
                    if not self.pp.is_first:  # the head's own copy on the last stage
                        self.lm_head.load_weight(tensor)
                    loaded.add("lm_head.weight")
            elif name == "lm_head.weight":
                if not self.tie_word_embeddings and self.pp.is_last:
                    self.lm_head.load_weight(tensor)
            elif name.startswith("norm_f.") and not self.pp.is_last:
                continue
            elif name.startswith("layers.") and not self._owns_layer(name):
                continue  # another pipeline stage's layer
            elif name.startswith("layers.") and ".mixer." in name:  # this rank's slices
                index, attr = name[len("layers."):].split(".mixer.", 1)
                name = self.load_mixer_tensor(int(index), attr, tensor)
            elif name in params:
                load_param(params[name], tensor, name)
            else:
                raise ValueError(f"Checkpoint tensor {name!r} has no place in "
                                 f"{type(self).__name__}; is this the right architecture?")
            loaded.add(name)
        return loaded


def load_param(param: torch.Tensor, tensor, name: str) -> None:
    tensor = materialize(tensor)
    if param.shape != tensor.shape:
        raise ValueError(f"Checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected "
                         f"{tuple(param.shape)}; the config does not match the weights.")
    param.data.copy_(tensor)
