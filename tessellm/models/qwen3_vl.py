"""Qwen3-VL dense (``Qwen3VLForConditionalGeneration``): Qwen2-VL's shape (image tokens as
embeddings, M-RoPE positions from ``multimodal/mrope.py``, the Qwen2-VL front end and image
processor) with its own tower (``qwen3_vl_vision.py``), a Qwen3 language model (q/k RMSNorm)
whose M-RoPE interleaves the three axes' frequencies, and DeepStack::

    tower -> [tokens, (1 + k) * hidden]: f (the embeddings) | d_0 | ... | d_k-1
    language model:  h = embed(ids), f at the image rows
                     after layer i < k:  h[image rows] += d_i      (HF's _deepstack_process)

The runner's encoder cache holds the concatenation, so chunked prefill and the prefix cache
hand every step its image rows of all of them. The addition goes into the residual stream,
which is whole on every tensor-parallel rank (the layer's MLP output is the partial sum).

Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``: Qwen3-VL-30B-A3B, 235B-A22B) is the same
model with a Qwen3-MoE language model (``models/moe.py``): the same tower, DeepStack and
M-RoPE, and the MoE layers' router and experts. Its checkpoints stack each layer's experts in
two tensors (``mlp.experts.gate_up_proj [E, H, 2I]``, ``mlp.experts.down_proj [E, I, H]``),
loaded by the MoE loader as are per-expert ones; the router always renormalizes its top-k
weights (HF's has no ``norm_topk_prob``), and the LM head is tied as the top-level config says.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.models import llama, moe
from tessellm.models.qwen2_vl import MRopeText, Qwen2VLForConditionalGeneration
from tessellm.models.qwen3_vl_vision import Qwen3VisionTower


class DeepStackText(MRopeText):
    """A Qwen3 language model (dense or MoE) with interleaved M-RoPE; mixed in before the
    family's ``*ForCausalLM``. ``forward`` adds the DeepStack features after the first layers
    when a step has image rows."""

    interleaved_mrope = True

    def forward(self, input_ids, positions, metadata, intermediate=None, inputs_embeds=None,
                deepstack: Optional[tuple[torch.Tensor, list[torch.Tensor]]] = None):
        """``deepstack``: (the step's image rows, per early layer their features) or None; only
        on the first pipeline stage, which holds every layer they are added after."""
        if deepstack is None:
            return super().forward(input_ids, positions, metadata, intermediate, inputs_embeds)
        rows, features = deepstack
        hidden, residual = inputs_embeds, None
        for i in range(self.start_layer, self.end_layer):
            hidden, residual = self.layers[i](positions, hidden, residual, metadata)
            if i < len(features):
                residual = residual.index_add(0, rows, features[i].to(residual.dtype))
        if not self.pp.is_last:  # the next stage continues from (hidden, residual)
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen3VLTextModel(DeepStackText, llama.Qwen3ForCausalLM):
    """Qwen3 with interleaved M-RoPE and DeepStack."""


class Qwen3VLMoeTextModel(DeepStackText, moe.Qwen3MoeForCausalLM):
    """Qwen3-MoE with interleaved M-RoPE and DeepStack."""

    def renormalize(self, config) -> bool:
        return True  # HF's Qwen3VLMoeTextTopKRouter always does


class Qwen3VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """``encode_images`` gives each image's rows of the embeddings and the DeepStack features
    side by side (``Qwen3VisionTower``); ``forward`` splits them."""

    text_model = Qwen3VLTextModel

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        deep = len(getattr(config.vision_config, "deepstack_visual_indexes", None) or ())
        lm = self.language_model
        if ctx.pp.num_stages > 1 and ctx.pp.is_first and deep > lm.end_layer - lm.start_layer:
            raise ValueError(f"{type(self).__name__} with images and pipeline parallelism needs "
                             f"its {deep} DeepStack layers on the first stage, which holds "
                             f"{lm.end_layer - lm.start_layer}; use fewer pipeline stages or "
                             "tensor parallelism.")
        if not self.tower_here:
            return
        self.hidden_size = int(config.vision_config.out_hidden_size)
        if self.hidden_size != self.language_model.config.hidden_size:
            raise ValueError(f"vision_config.out_hidden_size {self.hidden_size} is not the "
                             f"language model's hidden_size {self.language_model.config.hidden_size}.")
        if len(self.visual.deepstack_indexes) > len(self.language_model.layers):
            raise ValueError("Qwen3-VL has more deepstack_visual_indexes than decoder layers to "
                             "add them to; the config does not match the model.")

    def make_visual(self, vision) -> nn.Module:
        return Qwen3VisionTower(vision)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata,
                intermediate=None, mm_embeds=None):
        if mm_embeds is None:
            return self.language_model(input_ids, positions, metadata, intermediate)
        rows, feats = mm_embeds
        first, *deep = feats.split(self.hidden_size, dim=-1)
        embeds = self.language_model.embed_tokens(input_ids)
        embeds[rows] = first.to(embeds.dtype)
        return self.language_model(input_ids, positions, metadata, intermediate,
                                   inputs_embeds=embeds, deepstack=(rows, deep))


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL with the Qwen3-MoE language model (module docstring)."""

    text_model = Qwen3VLMoeTextModel
