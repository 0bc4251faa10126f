"""Front end of Mistral 3 images (``Mistral3ForConditionalGeneration``): a prompt and its
images -> token ids with each ``[IMG]`` expanded to its image's rows, and one
``MultiModalFeature`` per image (its pixels, the span of its rows, its size, its hash).

The HF image processor (``PixtralImageProcessor``, from ``preprocessor_config.json``) resizes
each image to fit its ``longest_edge`` and to multiples of ``patch * merge`` pixels (the
``patch_size`` that ``PixtralProcessor`` passes it) and pads the batch to its largest image;
each image's pixels are cut back to its own size here. ``PixtralProcessor`` itself needs
torchvision, so its one step beyond the image processor, the placeholder layout, is done here
over the tokenizer's ids as it does it over the text::

    image of rows x cols merged patches (2 x 3):
        [IMG] [IMG] [IMG] [IMG_BREAK] [IMG] [IMG] [IMG] [IMG_END]
        ^ the feature's span: rows * (cols + 1) tokens, from the first [IMG] to [IMG_END]

A prompt (text or token ids) holds ``[IMG]`` once per image, or, as token ids, the processor's
expanded layout; anything else is refused naming the expected count.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional, Sequence, Union

import numpy as np

from tessellm.multimodal.inputs import MultiModalFeature
from tessellm.multimodal.processor import (ImageProcessor, as_image_list, auto_image_processor, pixel_kwargs,
                                           saved_chat_template)

ARCHITECTURE = "Mistral3ForConditionalGeneration"


def is_mistral3(hf_config) -> bool:
    """Mistral 3, or Pixtral 12B (LLaVA with a Pixtral tower): the same prompt layout."""
    archs = getattr(hf_config, "architectures", None) or ()
    return ARCHITECTURE in archs or ("LlavaForConditionalGeneration" in archs and getattr(
        getattr(hf_config, "vision_config", None), "model_type", None) == "pixtral")


def _unit(config) -> int:
    """Pixels a side of one merged patch (one ``[IMG]``)."""
    from tessellm.models.mistral3 import merge_size

    return int(config.vision_config.patch_size) * merge_size(config)


def max_image_tokens(model_path: str, config) -> int:
    """Placeholder tokens of the biggest image the processor makes (a square of its
    ``longest_edge``)."""
    from tessellm.models.mistral3 import span_length

    size = getattr(auto_image_processor(model_path), "size", None) or {}
    edge = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    if not edge:
        raise ValueError("The model's image processor config has no size.longest_edge; is "
                         "preprocessor_config.json complete?")
    side = -(-int(edge) // _unit(config))
    return span_length(side, side)


class Mistral3ImageInputs(ImageProcessor):
    """``ImageProcessor``'s interface (``process``, ``check_count``, ``check_without_images``,
    ``image_token_id``: ``[IMG]``) for Mistral 3."""

    def _read_config(self, config) -> None:
        from tessellm.models.llava import image_token_id

        self.image_token_id = image_token_id(config)
        self.unit = _unit(config)

    @functools.cached_property
    def _row_ends(self) -> tuple[int, int]:
        """The ids of ``[IMG_BREAK]`` and ``[IMG_END]`` (or the names ``processor_config.json``
        gives them)."""
        names = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
        path = os.path.join(self.model_path, "processor_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            names = {k: saved.get(k) or v for k, v in names.items()}
        ids = []
        for name in names.values():
            token = self.tokenizer.convert_tokens_to_ids(name)
            if token is None or token == self.tokenizer.unk_token_id:
                raise ValueError(f"The tokenizer has no {name} token; Mistral 3 image prompts "
                                 "need it. Is this the model's tokenizer?")
            ids.append(int(token))
        return ids[0], ids[1]

    @property
    def chat_template(self) -> Optional[str]:
        return saved_chat_template(self.model_path)

    def layout(self, rows: int, cols: int) -> list[int]:
        """The placeholder ids of an image of ``rows x cols`` merged patches."""
        brk, end = self._row_ends
        out = ([self.image_token_id] * cols + [brk]) * rows
        out[-1] = end
        return out

    def process(self, prompt: Union[str, Sequence[int]], images,
                mm_kwargs: Optional[dict] = None) -> tuple[list[int], list[MultiModalFeature]]:
        extra = pixel_kwargs(self.check_mm_kwargs(mm_kwargs))
        images = as_image_list(images)
        self.check_count(len(images))
        if isinstance(prompt, str):
            ids = [int(t) for t in self.tokenizer(prompt)["input_ids"]]
        else:
            ids = list(prompt)
        out = self._run(lambda: self.images(images=images, patch_size=self.unit, return_tensors="np",
                                                  **extra))
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        sizes = [[int(v) for v in s] for s in out["image_sizes"]]
        if len(sizes) != len(images) or any(h % self.unit or w % self.unit for h, w in sizes):
            raise ValueError(f"The image processor gave sizes {sizes}, not multiples of "
                             f"{self.unit} px (patch x merge); its config does not match the model.")
        grids = [(h // self.unit, w // self.unit) for h, w in sizes]
        ids = self._expand_layouts(ids, grids)
        spans = self._layout_spans(ids, grids)
        return ids, [MultiModalFeature.from_pixels(p[:, :h, :w], start, len(self.layout(*g)),
                                                   image_size=(h, w))
                     for p, (h, w), g, start in zip(pixels, sizes, grids, spans)]

    def _expand_layouts(self, ids: list[int], grids: list) -> list[int]:
        """One ``[IMG]`` per image -> each image's layout; ids already expanded stay."""
        count = ids.count(self.image_token_id)
        if count == sum(r * c for r, c in grids):
            return ids
        if count != len(grids) or any(t in self._row_ends for t in ids):
            raise ValueError(self._count_error(count, [r * c for r, c in grids]))
        out: list[int] = []
        k = 0
        for t in ids:
            if t == self.image_token_id:
                out.extend(self.layout(*grids[k]))
                k += 1
            else:
                out.append(t)
        return out

    def _layout_spans(self, ids: list[int], grids: list) -> list[int]:
        """The first index of each image's layout, in order (each checked whole)."""
        starts, i = [], 0
        for k, grid in enumerate(grids):
            want = self.layout(*grid)
            s = ids.index(self.image_token_id, i) if self.image_token_id in ids[i:] else i
            if ids[s:s + len(want)] != want:
                raise ValueError(f"The placeholders of image {k} are not its {grid[0]} rows of "
                                 f"{grid[1]} [IMG] (each closed by [IMG_BREAK], the last by "
                                 "[IMG_END]); put one [IMG] per image in the prompt instead.")
            starts.append(s)
            i = s + len(want)
        return starts

    def _count_error(self, count: int, lengths: list[int]) -> str:
        return (f"The prompt has {count} [IMG] tokens (id {self.image_token_id}) for "
                f"{len(lengths)} image(s); put one [IMG] per image in the prompt, or the "
                f"processor's expanded ids ({', '.join(map(str, lengths))} [IMG] an image, in "
                "rows closed by [IMG_BREAK] and [IMG_END]).")
