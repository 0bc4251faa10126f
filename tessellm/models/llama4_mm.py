"""Llama 4 with images (``Llama4ForConditionalGeneration``: Scout, Maverick): the vision model
(``llama4_vision.py``), the multi-modal projector (one linear, no bias) and tessellm's Llama 4
language model (``llama4.py``).

The image processor cuts an image into tiles (a grid of rows x cols, plus a global view of the
whole image when there are several); each tile gives ``n`` tokens. The prompt holds them
between separator tokens (``multimodal/llama4_inputs.py``), and the image's span, the
placeholder range the runner caches features for, runs from its first ``<|patch|>`` to its
last, separators included::

    prompt  <|image_start|> P..P X P..P Y P..P X P..P Y <|image|> P..P <|image_end|>
                            \\______ span of a 2 x 2 image: 5 tiles of n P, 4 separators, 1 ____/
    feats   (encode_images) f..f 0 f..f 0 f..f 0 f..f 0 0 f..f     (0: a separator's row)
    embeds  text rows: embed_tokens; <|patch|> rows: the tile's projected features

``forward`` (``ImageTextModel``'s, ``sparse_image_rows``) writes the features only at
``<|patch|>`` rows, so the separators keep their own token embeddings, as HF's
``masked_scatter`` over ``image_token_id`` does. Attention over the
image is causal, as in HF (no bidirectional block): chunked prefill may split an image.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.models.image_embeds import ImageTextModel
from tessellm.models.llama4 import Llama4ForCausalLM
from tessellm.models.llama4_vision import Llama4VisionModel, tokens_per_tile
from tessellm.multimodal.llama4_inputs import patch_flags, tiles_of

_PARTS = ("vision_model", "multi_modal_projector", "language_model")


class Llama4MultiModalProjector(nn.Module):
    """The vision adapter's output -> the text hidden size (``linear_1``, no bias)."""

    def __init__(self, config):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.vision_output_dim,
                                  config.get_text_config().hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


class Llama4ForConditionalGeneration(ImageTextModel):
    """``forward``, ``compute_logits`` and ``attention_layers``: ``ImageTextModel``'s."""

    # The encoder cache hands every image of a call over at once: their tiles concatenated
    # ([tiles, 3, S, S]) and each image's tile grid (``MultiModalFeature.tile_grid``).
    tiled_images = True
    # Only the span's <|patch|> rows take features; the separators keep their embeddings.
    sparse_image_rows = True

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config = config
        vision = config.vision_config
        if vision.vision_output_dim != vision.projector_output_dim:
            raise ValueError(f"Llama 4 vision config vision_output_dim="
                             f"{vision.vision_output_dim} must equal projector_output_dim="
                             f"{vision.projector_output_dim} (the projector's input).")
        self.image_token_id = int(config.image_token_id)
        self.tokens_per_tile = tokens_per_tile(vision)
        self.tower_here = ctx.pp.is_first  # pipeline: the tower on the first stage only
        if self.tower_here:
            self.vision_model = Llama4VisionModel(vision)
            self.multi_modal_projector = Llama4MultiModalProjector(config)
        self.language_model = Llama4ForCausalLM(config.get_text_config(), ctx)

    # -- what the runner calls -------------------------------------------------------------

    def encode_images(self, tiles: torch.Tensor, grids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """``[T, 3, S, S]``: the tiles of several images in order, ``grids``: each image's
        ``(rows, cols)`` -> per image its span's rows ``[span, text hidden]`` (zeros at the
        separators)."""
        feats = self.multi_modal_projector(self.vision_model(tiles))
        hidden = feats.shape[-1]
        out, first = [], 0
        for grid in grids:
            count = tiles_of(grid)
            image = feats[first:first + count].reshape(-1, hidden)
            first += count
            flags = patch_flags(grid, self.tokens_per_tile)
            if all(flags):
                out.append(image)
                continue
            span = image.new_zeros(len(flags), hidden)
            span[torch.from_numpy(np.flatnonzero(flags)).to(span.device)] = image
            out.append(span)
        if first != tiles.shape[0]:
            raise ValueError(f"{tiles.shape[0]} tiles were given for tile grids {list(grids)}, "
                             f"which take {first}; the image inputs do not match.")
        return out

    def dummy_images(self, num_tokens: int, device) -> tuple[torch.Tensor, list]:
        """Single-tile images covering ``num_tokens`` placeholders (the memory profile)."""
        n = max(1, -(-num_tokens // self.tokens_per_tile))
        side = self.vision_model.image_size
        return (torch.zeros(n, self.vision_model.num_channels, side, side, device=device),
                [[1, 1]] * n)

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names: ``vision_model.*``, ``multi_modal_projector.*``, ``language_model.*``
        (``language_model.model.*``, ``language_model.lm_head.*``), with or without a leading
        ``model.``."""
        return self.load_routed_weights(weights, route=route_weight)


def route_weight(name: str) -> Optional[tuple[str, str]]:
    """(part, the rest of the name) of a Llama 4 checkpoint name; None: not one of ours."""
    if name.startswith("model.") and name[len("model."):].startswith(_PARTS):
        name = name[len("model."):]
    part, _, rest = name.partition(".")
    return (part, rest) if part in _PARTS else None
