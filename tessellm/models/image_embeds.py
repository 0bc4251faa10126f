"""What the image-text models (LLaVA, LLaVA-NeXT, Qwen2-VL) share: their step runs the
language model over the token embeddings with the image features written at the placeholder
rows the runner's encoder cache names (``mm_embeds``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class ImageTextModel(nn.Module):
    """A model with a ``language_model`` (tessellm's own, paged attention) that takes image
    features as embeddings."""

    supports_images = True  # the runner keeps an encoder cache for it

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata,
                intermediate=None, mm_embeds: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """``mm_embeds``: (token rows, their image features ``[rows, hidden]``), or None for a
        step with no image token in it."""
        embeds = None
        if mm_embeds is not None:
            rows, feats = mm_embeds
            embeds = self.language_model.embed_tokens(input_ids)
            embeds[rows] = feats.to(embeds.dtype)
        return self.language_model(input_ids, positions, metadata, intermediate, inputs_embeds=embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def attention_layers(self) -> list:
        return self.language_model.attention_layers()
