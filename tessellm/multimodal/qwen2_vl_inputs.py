"""Front end of Qwen2-VL / Qwen2.5-VL images: a prompt and its images -> token ids with each
``<|image_pad|>`` expanded to its image's token count, and one ``MultiModalFeature`` per image
(its flattened patches, span, ``(t, h, w)`` grid, hash).

The HF image processor (``Qwen2VLImageProcessor``, from the checkpoint's
``preprocessor_config.json``) resizes each image to a multiple of ``patch * merge`` pixels
within ``min_pixels`` / ``max_pixels`` and flattens it into patches; an image of grid
``(t, h, w)`` takes ``t * h * w / merge^2`` placeholder tokens (``Qwen2VLProcessor`` expands
the same way). The expansion is done here over the tokenizer's ids, not by the HF processor
object, which also needs a video processor (torchvision) that image inputs never use.
Video (``<|video_pad|>``) is refused.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from tessellm.multimodal.inputs import MultiModalFeature
from tessellm.multimodal.processor import (ImageProcessor, as_image_list, auto_image_processor,
                                           saved_chat_template)

ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                 "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")


def is_qwen2_vl(hf_config) -> bool:
    return any(a in ARCHITECTURES for a in getattr(hf_config, "architectures", None) or ())


def video_refusal() -> ValueError:
    return ValueError("Video inputs are not supported yet (Qwen2-VL takes images here); send "
                      "images, or frames as separate images.")


def max_image_tokens(model_path: str) -> int:
    """Placeholder tokens of the biggest image the processor makes (``max_pixels`` in patches
    of ``patch * merge`` pixels a side)."""
    processor = auto_image_processor(model_path)
    factor = processor.patch_size * processor.merge_size
    return _max_pixels(processor) // (factor * factor)


def _max_pixels(processor) -> int:
    size = getattr(processor, "size", None) or {}
    value = size.get("longest_edge") or size.get("max_pixels") or getattr(processor, "max_pixels", None)
    if not value:
        raise ValueError("The model's image processor config has no max_pixels (size.longest_edge); "
                         "is preprocessor_config.json complete?")
    return int(value)


class Qwen2VLImageInputs(ImageProcessor):
    """``ImageProcessor``'s interface (``process``, ``check_count``, ``image_token_id``) for
    Qwen2-VL; the placeholder expansion and span checks are the base class's."""

    def _read_config(self, config) -> None:
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = getattr(config, "video_token_id", None)
        self.merge = int(config.vision_config.spatial_merge_size)

    @property
    def chat_template(self) -> Optional[str]:
        """The processor's chat template (``chat_template.jinja`` / ``.json``) for a tokenizer
        that has none."""
        return saved_chat_template(self.model_path)

    def check_without_images(self, ids: Sequence[int]) -> None:
        super().check_without_images(ids)
        if self.video_token_id is not None and self.video_token_id in ids:
            raise video_refusal()

    def process(self, prompt: Union[str, Sequence[int]], images) -> tuple[list[int], list[MultiModalFeature]]:
        images = as_image_list(images)
        self.check_count(len(images))
        if isinstance(prompt, str):
            ids = [int(t) for t in self.tokenizer(prompt)["input_ids"]]
        else:
            ids = list(prompt)
        if self.video_token_id is not None and self.video_token_id in ids:
            raise video_refusal()
        out = self._run(lambda: self.images(images=images, return_tensors="np"))
        grids = [[int(v) for v in g] for g in out["image_grid_thw"]]
        patches = np.asarray(out["pixel_values"], dtype=np.float32)
        counts = [t * h * w for t, h, w in grids]
        if sum(counts) != patches.shape[0]:
            raise ValueError(f"The image processor gave {patches.shape[0]} patches for grids "
                             f"{grids}; its config does not match the model.")
        lengths = [n // (self.merge * self.merge) for n in counts]
        ids = self._expand(ids, lengths)
        spans = self._spans(ids, lengths)
        bounds = np.cumsum([0] + counts)
        return ids, [MultiModalFeature.from_pixels(patches[bounds[k]:bounds[k + 1]], start, n,
                                                   grid_thw=grid)
                     for k, (start, n, grid) in enumerate(zip(spans, lengths, grids))]

    def _count_error(self, count: int, lengths: list[int]) -> str:
        return (f"The prompt has {count} image placeholder tokens (<|image_pad|>, id "
                f"{self.image_token_id}) for {len(lengths)} image(s); put one "
                "<|vision_start|><|image_pad|><|vision_end|> per image in the prompt, or "
                f"{sum(lengths)} (each image's own count: {', '.join(map(str, lengths))}) when "
                "passing expanded token ids.")
