"""LLaVA-NeXT (LLaVA-1.6, "anyres"): LLaVA-1.5's CLIP tower, projector and language model
(``models/llava.py``), fed an image as several tiles, plus a learned ``image_newline``.

The image processor resizes and pads the image to the best of ``image_grid_pinpoints`` and cuts
it into ``gh x gw`` tiles of the tower's size, after a base tile (the whole image downscaled).
Each tile goes through the tower and the projector (``s x s`` patch features, the class token
dropped); the grid tiles are put back together, the padding rows (or columns) removed so the
grid has the image's aspect ratio, and ``image_newline`` appended to each row::

    tiles:     [base] [t00 t01]            features:  base (s*s rows)
                      [t10 t11]                       then the unpadded grid, row by row:
    grid (2s x 2s):   . . . . . .  <- padding rows         r0 c0 .. r0 cW, newline
                      x x x x x x     (dropped)            r1 c0 .. r1 cW, newline
                      x x x x x x                          ...
                      . . . . . .

    placeholder tokens = s*s + rows * (cols + 1)       (``image_feature_size``; the HF
                                                        processor's count too)

HF's ``LlavaNextModel.pack_image_features`` and vLLM's ``llava_next.py`` do the same.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.models.llava import LlavaForConditionalGeneration, feature_select_strategy


def best_pinpoint(image_size, pinpoints) -> tuple[int, int]:
    """The (height, width) of ``pinpoints`` an image of ``image_size`` (height, width) is
    resized and padded to, as the image processor picks it (transformers'
    ``select_best_resolution``): the most of the image's pixels kept at the pinpoint's scale
    (never more than it has), ties to the pinpoint with the least padding; first wins a full tie."""
    orig_h, orig_w = (int(v) for v in image_size)
    best, kept_best, waste_best = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / orig_w, h / orig_h)
        kept = min(int(orig_w * scale) * int(orig_h * scale), orig_w * orig_h)
        waste = w * h - kept
        if kept > kept_best or (kept == kept_best and waste < waste_best):
            best, kept_best, waste_best = (int(h), int(w)), kept, waste
    return best


def grid_shape(image_size, config) -> tuple[int, int]:
    """(tile rows, tile columns) of an image of ``image_size`` (height, width): the pinpoint
    the image processor picks (``best_pinpoint``) in tiles of the tower's size."""
    tile = config.vision_config.image_size
    height, width = best_pinpoint(image_size, config.image_grid_pinpoints)
    return height // tile, width // tile


def image_feature_size(image_size, config) -> int:
    """Placeholder tokens of an image of ``image_size`` (height, width): the base tile's
    ``s*s`` features, then the grid's patch rows and columns left after ``unpadded_window``,
    each row plus its ``image_newline``; exactly the rows ``_pack`` gives the image, and what
    HF's LlavaNextProcessor expands ``<image>`` to (tests/multimodal/test_llava_next_counts.py)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = grid_shape(image_size, config)
    keep_rows, keep_cols = unpadded_window(rows * side, cols * side, *(int(v) for v in image_size))
    height = keep_rows.stop - keep_rows.start
    width = keep_cols.stop - keep_cols.start
    return side * side + height * (width + 1)


def unpadded_window(height: int, width: int, orig_height: int, orig_width: int) -> tuple[slice, slice]:
    """The rows and columns of a ``height x width`` patch grid that hold the image (not the
    padding the image processor added to reach the pinpoint's aspect ratio); as HF's
    ``unpad_image``, float comparison and rounding included."""
    if orig_width / orig_height > width / height:
        new_height = int(round(orig_height * (width / orig_width), 7))
        pad = (height - new_height) // 2
        return slice(pad, height - pad), slice(0, width)
    new_width = int(round(orig_width * (height / orig_height), 7))
    pad = (width - new_width) // 2
    return slice(0, height), slice(pad, width - pad)


def max_image_feature_size(config) -> int:
    """Placeholder tokens of the biggest image: one the size of the largest pinpoint (no
    padding to drop), ``s*s + rows * (cols + 1)``."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    tile = config.vision_config.image_size
    return max(side * side + (h // tile * side) * (w // tile * side + 1)
               for h, w in config.image_grid_pinpoints)


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, config, ctx: ModelContext):
        if feature_select_strategy(config) != "default":
            raise ValueError("LLaVA-NeXT with vision_feature_select_strategy 'full' is not "
                             "supported: its tile grid needs the class token dropped ('default').")
        if not getattr(config, "image_grid_pinpoints", None):
            raise ValueError("The LLaVA-NeXT config has no image_grid_pinpoints; is it complete?")
        super().__init__(config, ctx)
        self.feature_size = max_image_feature_size(config)
        self.side = config.vision_config.image_size // config.vision_config.patch_size
        if self.tower_here:  # the row-end feature: the tower's stage only (pipeline)
            self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))

    def encode_images(self, pixels: torch.Tensor, image_sizes=None) -> list[torch.Tensor]:
        """``[N, tiles, 3, S, S]`` (base tile first) and each image's original (height, width)
        -> per image ``[placeholders, text hidden]``."""
        if image_sizes is None or any(s is None for s in image_sizes):
            raise ValueError("LLaVA-NeXT images need their original sizes (image_size); "
                             "preprocess them with the model's processor.")
        n, tiles = pixels.shape[:2]
        feats = super().encode_images(pixels.flatten(0, 1)).unflatten(0, (n, tiles))
        return [self._pack(f, size) for f, size in zip(feats, image_sizes)]

    def _pack(self, feats: torch.Tensor, image_size) -> torch.Tensor:
        """One image's tile features ``[tiles, s*s, hidden]`` -> base rows, then the unpadded
        grid row by row, each row ending in ``image_newline``."""
        rows, cols = grid_shape(image_size, self.config)
        if feats.shape[0] != rows * cols + 1:
            raise ValueError(f"An image of size {tuple(image_size)} has {feats.shape[0]} tiles; "
                             f"the grid pinpoints give {rows}x{cols} plus the base tile. Preprocess "
                             "it with the model's image processor.")
        s = self.side
        grid = feats[1:].view(rows, cols, s, s, -1).permute(0, 2, 1, 3, 4).reshape(rows * s, cols * s, -1)
        keep_rows, keep_cols = unpadded_window(rows * s, cols * s, *image_size)
        grid = grid[keep_rows, keep_cols]
        newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, -1)
        return torch.cat([feats[0], torch.cat([grid, newline], dim=1).flatten(0, 1)])

    def dummy_images(self, num_tokens: int, device) -> tuple[torch.Tensor, list]:
        """Blank images of the largest pinpoint (the most tiles and features), enough to cover
        ``num_tokens`` placeholders whole."""
        height, width = max(self.config.image_grid_pinpoints, key=lambda p: p[0] * p[1])
        tower = self.vision_tower.embeddings
        rows, cols = grid_shape((height, width), self.config)
        n = max(1, -(-num_tokens // self.feature_size))
        pixels = torch.zeros(n, rows * cols + 1, tower.patch_embedding.in_channels,
                             tower.image_size, tower.image_size, device=device)
        return pixels, [[height, width]] * n
