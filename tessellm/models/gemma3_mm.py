"""Gemma 3 with images (``Gemma3ForConditionalGeneration``: Gemma 3 4B / 12B / 27B): a SigLIP
vision tower (``siglip.py``), the multi-modal projector and tessellm's Gemma 3 language model
(``gemma3.py``)::

    image (896 px) -> SigLIP -> 64 x 64 patches -> average pool 4 x 4 -> 16 x 16 = 256 tokens
        -> soft-embedding RMSNorm (1 + w) -> @ mm_input_projection_weight -> text hidden size
    prompt   ... \\n\\n <start_of_image> <image_soft_token> x 256 <end_of_image> \\n\\n ...
    embeds   text rows: embed_tokens * sqrt(hidden); image rows: the projected features (unscaled)

The image's soft tokens attend to each other both ways (HF: ``token_type_ids``, a block mask
over each run of image tokens, OR'ed with the causal mask; AND'ed with the sliding window on
local layers). Here that is the attention's key limits (``AttentionSpec.prefill_key_limits``,
``AttentionBatch.key_limits``): a soft token sees keys up to its image's last token. The runner
sets them (``multimodal/image_spans.py``), and the scheduler never ends a prefill chunk inside
an image (``whole_images``), so the later keys are in the cache when a row attends. A backend
whose attention kernel does not declare ``supports_key_limits`` refuses the model at load.

Pan & Scan (extra crops per image) is refused by the front end (``gemma3_inputs.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.models.gemma3 import Gemma3ForCausalLM
from tessellm.models.image_embeds import ImageTextModel
from tessellm.models.siglip import SiglipVisionTower, unused_siglip_weight
from tessellm.multimodal.gemma3_inputs import image_feature_size


class Gemma3MultiModalProjector(nn.Module):
    """Patches ``[B, p*p, vision hidden]`` -> average pooled ``[B, t*t, vision hidden]`` ->
    RMSNorm ``(1 + w)`` in float32 -> ``@ mm_input_projection_weight`` -> text hidden."""

    def __init__(self, config):
        super().__init__()
        vision, text = config.vision_config, config.text_config
        self.patches_per_side = vision.image_size // vision.patch_size
        self.tokens_per_side = int(round(config.mm_tokens_per_image ** 0.5))
        if (self.tokens_per_side ** 2 != config.mm_tokens_per_image
                or self.patches_per_side % self.tokens_per_side):
            raise ValueError(f"Gemma 3 mm_tokens_per_image {config.mm_tokens_per_image} must be a "
                             f"square whose side divides the tower's {self.patches_per_side} "
                             "patches a side.")
        self.kernel = self.patches_per_side // self.tokens_per_side
        self.eps = vision.layer_norm_eps
        self.mm_input_projection_weight = nn.Parameter(torch.empty(vision.hidden_size,
                                                                   text.hidden_size))
        self.mm_soft_emb_norm = nn.Module()
        self.mm_soft_emb_norm.weight = nn.Parameter(torch.empty(vision.hidden_size))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, _, hidden = patches.shape
        side = self.patches_per_side
        grid = patches.transpose(1, 2).reshape(b, hidden, side, side)
        pooled = nn.functional.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        x = pooled.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = (x * (1.0 + self.mm_soft_emb_norm.weight.float())).to(patches.dtype)
        return torch.matmul(normed, self.mm_input_projection_weight).to(patches.dtype)


class Gemma3ForConditionalGeneration(ImageTextModel):
    """``compute_logits`` and ``attention_layers``: ``ImageTextModel``'s."""

    # The runner gives the attention key limits over each image's span (image_spans.py), and
    # the scheduler keeps every image in one prefill chunk (encoder_budget_args).
    bidirectional_images = True

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config = config
        vision = config.vision_config
        if getattr(vision, "model_type", "siglip_vision_model") != "siglip_vision_model":
            raise ValueError(f"Gemma 3 with a {vision.model_type!r} vision tower is not "
                             "supported; tessellm runs its SigLIP tower.")
        self.image_token_id = int(config.image_token_id)
        self.feature_size = image_feature_size(config)
        # pipeline parallelism: the tower on the first stage only; every stage's kernels let
        # image rows see their whole image (the runner's key limits come from the requests'
        # image spans on each stage)
        self.tower_here = ctx.pp.is_first
        if self.tower_here:
            self.vision_tower = SiglipVisionTower(vision)
            self.multi_modal_projector = Gemma3MultiModalProjector(config)
        # Every attention kernel of the language model lets image rows see their whole image.
        lm_ctx = dataclasses.replace(ctx, make_attention_kernel=functools.partial(
            ctx.make_attention_kernel, prefill_key_limits=True))
        self.language_model = Gemma3ForCausalLM(config.text_config, lm_ctx)
        # HF scales the text embeddings only (the scale is inside its embedding module): the
        # language model takes embeddings already scaled, ``forward`` scales the text rows.
        self.embed_scale = self.language_model.embedding_multiplier
        self.language_model.embedding_multiplier = 1.0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata,
                intermediate=None, mm_embeds=None):
        """``mm_embeds``: (token rows, their image features ``[rows, hidden]``) or None."""
        if not self.tower_here:  # a later pipeline stage: the previous one's hidden states
            return self.language_model(input_ids, positions, metadata, intermediate)
        embeds = self.language_model.embed_tokens(input_ids) * self.embed_scale
        if mm_embeds is not None:
            rows, feats = mm_embeds
            embeds[rows] = feats.to(embeds.dtype)
        return self.language_model(input_ids, positions, metadata, intermediate,
                                   inputs_embeds=embeds)

    # -- what the runner calls -------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor, image_sizes=None) -> torch.Tensor:
        """``[N, 3, H, W]`` preprocessed images -> ``[N, mm_tokens_per_image, text hidden]``."""
        return self.multi_modal_projector(self.vision_tower(pixels))

    def dummy_images(self, num_tokens: int, device) -> tuple[torch.Tensor, list]:
        """Blank images covering ``num_tokens`` soft tokens whole (the memory profile)."""
        emb = self.vision_tower.embeddings
        n = max(1, -(-num_tokens // self.feature_size))
        side = emb.image_size
        return (torch.zeros(n, emb.patch_embedding.in_channels, side, side, device=device),
                [[side, side]] * n)

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names, in either layout: the older one (``vision_tower.vision_model.*``,
        ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``)
        or transformers 5's (``model.vision_tower.vision_model.*``,
        ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``)."""
        return self.load_routed_weights(weights, unused_siglip_weight)
