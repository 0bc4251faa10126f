"""Front end of Llama 4 images (``Llama4ForConditionalGeneration``): a prompt and its images ->
token ids with each ``<|image|>`` expanded to the image's tile tokens, and one
``MultiModalFeature`` per image (its tiles, its span, its tile grid, its hash).

HF's ``Llama4Processor`` does the work (its ``Llama4ImageProcessor``, which needs torchvision,
picks the best canvas of at most ``max_patches`` tiles, resizes and pads the image onto it,
cuts it into ``rows x cols`` tiles of ``image_size`` px and, for more than one tile, adds a
global view; its tokenizer expands the placeholder). An image's tokens, ``n`` per tile::

    1 tile:    <|image_start|> <|image|> P x n <|image_end|>
    2 x 2:     <|image_start|> P x n X P x n Y P x n X P x n Y <|image|> P x n <|image_end|>
                               ^ span start (first P)                         span end ^
    (P <|patch|>, X <|tile_x_separator|>, Y <|tile_y_separator|>; ``patch_flags``)

A prompt of token ids holds ``<|image|>`` once per image (each becomes the processor's
sequence for that image) or comes expanded; each image's span is checked against its grid.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional, Sequence, Union

import numpy as np

from tessellm.multimodal.inputs import MultiModalFeature
from tessellm.multimodal.processor import ImageProcessor, as_image_list, pixel_kwargs

ARCHITECTURE = "Llama4ForConditionalGeneration"
DEFAULT_MAX_PATCHES = 16  # Llama4ImageProcessor's default


def is_llama4_mm(hf_config) -> bool:
    return ARCHITECTURE in (getattr(hf_config, "architectures", None) or ())


def tiles_of(grid: Sequence[int]) -> int:
    """Tiles the processor gives an image of ``(rows, cols)``: the grid, plus the global view
    when there are several."""
    rows, cols = grid
    return rows * cols + (1 if rows * cols > 1 else 0)


def span_kinds(grid: Sequence[int], n: int) -> list[str]:
    """The span's tokens, first ``<|patch|>`` to last: "P", "X", "Y" or "I" (``<|image|>``)."""
    rows, cols = grid
    if rows * cols == 1:
        return ["P"] * n
    out: list[str] = []
    for _ in range(rows):
        for x in range(cols):
            out += ["P"] * n + (["X"] if x < cols - 1 else [])
        out.append("Y")
    return out + ["I"] + ["P"] * n


def patch_flags(grid: Sequence[int], n: int) -> list[bool]:
    return [k == "P" for k in span_kinds(grid, n)]


def max_image_tokens(hf_config, model_path: str) -> int:
    """Span of the biggest image: ``max_patches`` tiles and the global view (the image
    processor's ``max_patches``, read from the checkpoint's processor config)."""
    from tessellm.models.llama4_vision import tokens_per_tile

    tiles = _max_patches(model_path)
    return len(span_kinds((1, tiles), tokens_per_tile(hf_config.vision_config)))


def _max_patches(model_path: str) -> int:
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            data = data.get(key) or {} if key else data
            if "max_patches" in data:
                return int(data["max_patches"])
    return DEFAULT_MAX_PATCHES


class Llama4ImageInputs(ImageProcessor):
    """``ImageProcessor``'s interface (``process``, ``check_count``, ``check_without_images``,
    ``placeholder_token_id``: ``<|image|>``) for Llama 4; ``image_token_id`` is
    ``<|patch|>``, the token the features go to.

    ``mm_processor_kwargs``: none (its image processor here leaves the pixel-value keys
    without effect, so they are refused by name rather than silently ignored)."""

    mm_kwargs_keys = ()

    def _read_config(self, config) -> None:
        from tessellm.models.llama4_vision import tokens_per_tile

        self.image_token_id = int(config.image_token_id)
        self.per_tile = tokens_per_tile(config.vision_config)
        self.image_size = int(np.ravel(config.vision_config.image_size)[0])

    @functools.cached_property
    def hf(self):
        try:
            return super().hf
        except ValueError as exc:
            if "torchvision" not in str(exc).lower():
                raise
            raise ValueError("Llama 4 image inputs need torchvision (transformers' "
                             "Llama4ImageProcessor runs on it); pip install the torchvision "
                             "release that matches your torch.") from None

    @functools.cached_property
    def token_ids(self) -> dict[str, int]:
        """Ids of the span's tokens ("P", "X", "Y", "I") and the image's start token."""
        hf = self.hf
        names = {"P": hf.img_patch_token, "X": hf.tile_token, "Y": hf.tile_global_token,
                 "I": hf.fake_image_token, "S": hf.start_of_img_token}
        ids = {k: int(hf.tokenizer.convert_tokens_to_ids(v)) for k, v in names.items()}
        if ids["P"] != self.image_token_id:
            raise ValueError(f"The processor's {hf.img_patch_token} is token {ids['P']} but the "
                             f"config's image_token_index is {self.image_token_id}; the "
                             "checkpoint's tokenizer does not match its config.json.")
        return ids

    @property
    def placeholder_token_id(self) -> int:
        return self.token_ids["I"]

    def process(self, prompt: Union[str, Sequence[int]], images,
                mm_kwargs: Optional[dict] = None) -> tuple[list[int], list[MultiModalFeature]]:
        extra = pixel_kwargs(self.check_mm_kwargs(mm_kwargs))
        images = as_image_list(images)
        self.check_count(len(images))
        hf, tokens = self.hf, self.token_ids
        if isinstance(prompt, str):
            if prompt.count(hf.fake_image_token) != len(images):
                raise ValueError(f"The prompt has {prompt.count(hf.fake_image_token)} "
                                 f"{hf.fake_image_token} for {len(images)} image(s); put one "
                                 f"{hf.fake_image_token} in the prompt where each image goes.")
            out = self._run(lambda: hf(text=prompt, images=images, return_tensors="pt", **extra))
            ids = [int(t) for t in out["input_ids"][0]]
            grids = self._grids_from_ids(ids, len(images))
        else:
            out = self._run(lambda: hf.image_processor(images=images, return_tensors="pt", **extra))
            grids = [[int(v) for v in g] for g in out["aspect_ratios"]]
            ids = self._expand(list(prompt), out)
        pixels = out["pixel_values"].float().numpy()
        counts = [tiles_of(g) for g in grids]
        if pixels.shape[0] != sum(counts) or tuple(pixels.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"The model's image processor gives {tuple(pixels.shape)} tiles for "
                             f"tile grids {grids}, but the vision model takes "
                             f"{self.image_size}x{self.image_size} tiles, {sum(counts)} here; the "
                             "checkpoint's processor config does not match its config.json.")
        bounds = np.cumsum([0] + counts)
        features = []
        start = 0
        for k, grid in enumerate(grids):
            offset = self._find_span(ids, grid, start, k)
            length = len(span_kinds(grid, self.per_tile))
            features.append(MultiModalFeature.from_pixels(pixels[bounds[k]:bounds[k + 1]], offset,
                                                          length, tile_grid=grid))
            start = offset + length
        in_spans = sum(span_kinds(g, self.per_tile).count("P") for g in grids)
        if ids.count(tokens["P"]) != in_spans:
            raise ValueError(f"The prompt has {ids.count(tokens['P'])} <|patch|> tokens where "
                             f"its images take {in_spans}; do not write <|patch|> in the text.")
        return ids, features

    def _expand(self, ids: list[int], out) -> list[int]:
        """Token ids with one ``<|image|>`` per image (and no ``<|patch|>``) -> each one the
        processor's sequence for its image; expanded ids stay as they are."""
        tokens = self.token_ids
        num = len(out["aspect_ratios"])
        if tokens["P"] in ids:
            return ids
        if ids.count(tokens["I"]) != num:
            raise ValueError(f"The prompt has {ids.count(tokens['I'])} <|image|> tokens (id "
                             f"{tokens['I']}) for {num} image(s); put one <|image|> per image in "
                             "the prompt, or pass the processor's expanded ids.")
        expanded, k = [], 0
        for t in ids:
            if t != tokens["I"]:
                expanded.append(t)
                continue
            text = self.hf.replace_image_token(out, image_idx=k)
            expanded += [int(v) for v in self.hf.tokenizer(text, add_special_tokens=False)["input_ids"]]
            k += 1
        return expanded

    def _grids_from_ids(self, ids: list[int], num: int) -> list[list[int]]:
        """Each image's ``(rows, cols)`` read off the processor's expanded ids."""
        tokens = self.token_ids
        starts = [i for i, t in enumerate(ids) if t == tokens["S"]]
        if len(starts) != num:
            raise ValueError(f"The processor's ids hold {len(starts)} <|image_start|> for {num} "
                             "image(s); do not write <|image_start|> in the prompt text.")
        grids = []
        for s in starts:
            end = ids.index(tokens["I"], s)
            rows = ids[s:end].count(tokens["Y"])
            grids.append([rows, ids[s:end].count(tokens["X"]) // rows + 1] if rows else [1, 1])
        return grids

    def _find_span(self, ids: list[int], grid, start: int, k: int) -> int:
        """The offset of image ``k``'s span (its first ``<|patch|>`` at or after ``start``),
        checked token by token against its grid's layout."""
        tokens = self.token_ids
        want = [tokens[kind] for kind in span_kinds(grid, self.per_tile)]
        try:
            offset = ids.index(tokens["P"], start)
        except ValueError:
            offset = -1
        if offset < 0 or ids[offset:offset + len(want)] != want:
            raise ValueError(f"The prompt's tokens for image {k} are not the processor's layout "
                             f"for its {grid[0]}x{grid[1]} tiles ({len(want)} tokens from its "
                             "first <|patch|>); write one <|image|> per image, or pass the "
                             "processor's expanded ids unchanged.")
        return offset

    def _count_error(self, count: int, lengths: list[int]) -> str:
        return (f"The prompt has {count} <|patch|> tokens (id {self.image_token_id}) for "
                f"{len(lengths)} image(s); put one <|image|> per image in the prompt.")
