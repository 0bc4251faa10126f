"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): a variable-resolution ViT (``qwen2_vl_vision.py``)
and a Qwen2 language model with multimodal rotary positions (M-RoPE, ``layers/mrotary.py``).

The image tokens enter the language model as embeddings, as LLaVA's do (``models/llava.py``)::

    prompt ids  [<|im_start|> user \\n <|vision_start|> <pad> x N <|vision_end|> What ...]
    embeddings  [e ... e  f0 ... fN-1  e ...]          f = tower(patches, grid)
    positions   text: one each, t = h = w; image: (start, start + row, start + col) over its
                merged grid; text after it continues at max + 1 (``multimodal/mrope.py``)

The runner keeps each request's prompt positions and the rope delta that every later token's
position carries (``uses_mrope``); the image features come through its encoder cache, all the
images a step reaches in one tower call (``variable_resolution``: patches concatenated, one
grid each).
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.linear import materialize
from tessellm.layers.mrotary import MRotaryEmbedding
from tessellm.models import llama
from tessellm.models.decoder import DecoderAttention
from tessellm.models.image_embeds import ImageTextModel
from tessellm.models.qwen2_vl_vision import vision_tower


class MRopeAttention(DecoderAttention):
    """A kernel that fuses rotary looks cos/sin rows up by position; in a step with image
    tokens (positions ``[3, T]``) it is handed each token's own row instead
    (``MRotaryEmbedding.kernel_inputs``). Other steps, and unfused kernels (the rotary op
    takes ``[3, T]`` itself), run ``DecoderAttention`` as it is."""

    def forward(self, positions, hidden, metadata):
        if positions.dim() == 1 or not self.fuse_rotary:
            return super().forward(positions, hidden, metadata)
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.norm_qk(q, k)  # Qwen3-VL's per-head q/k norms, before the rotation
        return self.o_proj(self.attn(q, k, v, metadata, *self.rotary.kernel_inputs(positions)))


class MRopeText:
    """A decoder family with M-RoPE: positions ``[T]`` (text only) or ``[3, T]`` (a step with
    image tokens). Mixed in before the family's ``*ForCausalLM``; ``interleaved_mrope``:
    Qwen3-VL's frequency layout (``MRotaryEmbedding``)."""

    interleaved_mrope = False

    def make_attention(self, config, ctx: ModelContext, rotary, index: int) -> MRopeAttention:
        qkv_bias, o_bias = self.attention_biases(config)
        return MRopeAttention(config, ctx, rotary, qkv_bias, self.qk_norm, o_bias,
                              self.layer_window(config, index))

    def make_rotary(self, config, head_size: int, ctx: ModelContext):
        from tessellm.layers.rope_config import rope_max_positions, rope_parameters

        params = rope_parameters(config)
        section = params.get("mrope_section")
        if not section:
            raise ValueError("The vision-language text config has no rope_parameters.mrope_section; "
                             "is the config complete?")
        if params["rope_type"] != "default":
            raise ValueError(f"M-RoPE with rope_type {params['rope_type']!r} is not supported; "
                             "it runs the default rotary frequencies.")
        return MRotaryEmbedding(head_size, rope_max_positions(config), params["rope_theta"], params,
                                ctx.ops, section,
                                rotary_dim=int(head_size * params.get("partial_rotary_factor", 1.0)),
                                max_positions=ctx.max_positions, interleaved=self.interleaved_mrope)


class Qwen2VLTextModel(MRopeText, llama.Qwen2ForCausalLM):
    """Qwen2 with M-RoPE."""


class Qwen2VLForConditionalGeneration(ImageTextModel):
    """``forward`` takes positions ``[T]`` or ``[3, T]`` (M-RoPE) and the image features at
    their placeholder rows (``ImageTextModel``)."""

    uses_mrope = True  # ... and per-request 3-D positions (multimodal/mrope.py)
    variable_resolution = True  # encode_images takes concatenated patches and their grids

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config = config
        text, vision = _text_config(config), config.vision_config
        self.image_token_id = int(config.image_token_id)
        self.spatial_merge_size = int(vision.spatial_merge_size)
        # pipeline parallelism: the tower on the first stage (which embeds the prompt) only
        self.tower_here = ctx.pp.is_first
        if self.tower_here:
            self.visual = self.make_visual(vision)
        self.language_model = self.text_model(text, ctx)

    text_model = Qwen2VLTextModel  # the language model's class

    def make_visual(self, vision) -> nn.Module:
        return vision_tower(vision)

    # -- what the runner calls -------------------------------------------------------------

    def encode_images(self, patches: torch.Tensor, grids) -> list[torch.Tensor]:
        """``[P, values]`` patches of several images, their ``(t, h, w)`` grids -> per image
        ``[t * h * w / merge^2, text hidden]``."""
        feats = self.visual(patches, grids)
        unit = self.spatial_merge_size ** 2
        return list(feats.split([t * h * w // unit for t, h, w in grids]))

    def dummy_images(self, num_tokens: int, device) -> tuple[torch.Tensor, list]:
        """Blank square images covering ``num_tokens`` placeholders (at most 64 x 64 merge
        blocks each), and their grids, for the memory profile."""
        m = self.spatial_merge_size
        side = max(1, min(64, int(num_tokens ** 0.5)))
        n = max(1, -(-num_tokens // (side * side)))
        grids = [[1, side * m, side * m]] * n
        values = self.visual.patch_embed.proj.weight[0].numel()
        return torch.zeros(n * (side * m) ** 2, values, device=device), grids

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names in either layout: transformers 5's (``model.visual.*``,
        ``model.language_model.*``, ``lm_head.*``) or the Qwen checkpoints' (``visual.*``,
        ``model.*``, ``lm_head.*``)."""
        params = dict(self.visual.named_parameters()) if self.tower_here else {}
        loaded: set[str] = set()

        def text_weights():  # lazy: a file's tensors are read while it is open
            for name, tensor in weights:
                if name.startswith("model."):
                    name = name[len("model."):]
                if name.startswith("visual."):
                    rest = name[len("visual."):]
                    if not self.tower_here:  # a later pipeline stage: the first one's
                        continue
                    if rest not in params:
                        raise ValueError(f"Checkpoint tensor {name!r} has no place in the "
                                         f"{type(self).__name__} vision tower; does the config "
                                         "match the weights?")
                    llama._copy(params[rest], materialize(tensor), name)
                    loaded.add("visual." + rest)
                    continue
                if name.startswith("language_model."):
                    name = name[len("language_model."):]
                yield name, tensor

        loaded |= {f"language_model.{n}" for n in self.language_model.load_weights(text_weights())}
        return loaded


def _text_config(config):
    """The language model's config, with the top-level ``tie_word_embeddings`` on a copy: HF
    ties the head as the top-level config says (transformers 5 keeps the flag there only for
    Qwen2-VL-2B's and Qwen2.5-VL-3B's tied heads; Qwen3-VL-MoE's text config defaults to True
    where the model's is False)."""
    text = config.get_text_config()
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(text, "tie_word_embeddings", None)
    if getattr(text, "tie_word_embeddings", None) != bool(tied):
        text = copy.copy(text)
        text.tie_word_embeddings = bool(tied)
    return text


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: the same language model and positions; the tower with window attention
    (``qwen2_vl_vision.Qwen25VisionTower``), chosen by its vision config."""

    def __init__(self, config, ctx: ModelContext):
        if getattr(config.vision_config, "fullatt_block_indexes", None) is None:
            raise ValueError("The Qwen2.5-VL vision config has no fullatt_block_indexes; is it "
                             "complete?")
        super().__init__(config, ctx)
