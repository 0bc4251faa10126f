"""What the image-text models (LLaVA, LLaVA-NeXT, Qwen2-VL) share: their step runs the
language model over the token embeddings with the image features written at the placeholder
rows the runner's encoder cache names (``mm_embeds``)."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn


class ImageTextModel(nn.Module):
    """A model with a ``language_model`` (tessellm's own, paged attention) that takes image
    features as embeddings."""

    supports_images = True  # the runner keeps an encoder cache for it
    # pipeline parallelism: the tower and projector are built and loaded on the first stage
    # (which embeds the prompt) only; a model sets it False on the other stages
    tower_here = True
    # an image's span also holds other tokens (Pixtral's [IMG_BREAK] / [IMG_END]): only the
    # rows whose token is ``image_token_id`` take its feature, the rest keep their embedding
    sparse_image_rows = False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata,
                intermediate=None, mm_embeds: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """``mm_embeds``: (token rows, their image features ``[rows, hidden]``), or None for a
        step with no image token in it."""
        embeds = None
        if mm_embeds is not None:
            rows, feats = mm_embeds
            embeds = self.language_model.embed_tokens(input_ids)
            feats = feats.to(embeds.dtype)
            if self.sparse_image_rows:
                image = (input_ids[rows] == self.image_token_id)[:, None]
                feats = torch.where(image, feats, embeds[rows])
            embeds[rows] = feats
        return self.language_model(input_ids, positions, metadata, intermediate, inputs_embeds=embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def attention_layers(self) -> list:
        return self.language_model.attention_layers()

    def load_routed_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                            unused: Callable[[str], bool] = lambda rest: False,
                            route: Optional[Callable[[str], Optional[tuple[str, str]]]] = None
                            ) -> set[str]:
        """HF names in the layout LLaVA, Gemma 3 and Mistral 3 share (``llava.route_weight``):
        ``vision_tower.*`` and ``multi_modal_projector.*`` copied here, the language model's
        streamed to its own ``load_weights``. ``unused(rest)``: a vision tower weight the model
        does not build (skipped); any other unknown name is refused. ``route(name)``: a model
        whose checkpoint parts are named otherwise (Llama 4's ``vision_model``) maps a name to
        ``(part, rest)`` (None: no place) itself."""
        from tessellm.layers.linear import materialize
        from tessellm.models.llama import _copy
        from tessellm.models.llava import route_weight

        route = route or route_weight
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        arch = type(self).__name__

        def text_weights():  # lazy: a file's tensors are read while it is open
            for name, tensor in weights:
                routed = route(name)
                part, rest = routed or (None, None)
                if part == "language_model":
                    yield rest, tensor
                    continue
                if not self.tower_here:  # a later pipeline stage: the first one's
                    continue
                if part == "vision_tower" and unused(rest):
                    continue
                target = f"{part}.{rest}"
                if routed is None or target not in params:
                    raise ValueError(f"Checkpoint tensor {name!r} has no place in {arch}; is "
                                     "this the right architecture, and does the config match "
                                     "the weights?")
                _copy(params[target], materialize(tensor), name)
                loaded.add(target)

        loaded |= {f"language_model.{n}" for n in self.language_model.load_weights(text_weights())}
        return loaded
