"""Front end of Gemma 3 images (``Gemma3ForConditionalGeneration``): a prompt and its images ->
token ids with each ``<start_of_image>`` expanded to the image's soft tokens, and one
``MultiModalFeature`` per image (its pixels, the span of its soft tokens, its hash).

The HF processor (``Gemma3Processor``: the tokenizer and ``Gemma3ImageProcessor``, resize to
896 px and normalize) does the work for a text prompt, so ids and pixels are what transformers
would feed the model::

    text:   ... <start_of_image> ...
    ids:    ... \\n\\n <start_of_image> <image_soft_token> x 256 <end_of_image> \\n\\n ...
                                       ^ the feature's span: the soft tokens only (HF's
                                         token_type_ids == 1, the block that attends both ways)

A prompt of token ids may hold ``<start_of_image>`` once per image (each becomes the
processor's full image sequence, tokenized alone) or come expanded. A chat prompt is expanded
as HF expands its text (``expand_chat_ids``), so its tokens are the processor's. Pan & Scan (``do_pan_and_scan``: extra crops
of an image, each with its own soft tokens) is refused: each image is one 896 px view.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import numpy as np

from tessellm.multimodal.inputs import MultiModalFeature
from tessellm.multimodal.processor import ImageProcessor, as_image_list, pixel_kwargs

ARCHITECTURE = "Gemma3ForConditionalGeneration"


def is_gemma3_mm(hf_config) -> bool:
    return ARCHITECTURE in (getattr(hf_config, "architectures", None) or ())


def image_feature_size(config) -> int:
    """Soft tokens per image: ``mm_tokens_per_image`` (256), a square of pooled patches."""
    return int(config.mm_tokens_per_image)


class Gemma3ImageInputs(ImageProcessor):
    """``ImageProcessor``'s interface (``process``, ``check_count``, ``check_without_images``,
    ``image_token_id``: the soft token) for Gemma 3; span checks are the base class's."""

    def _read_config(self, config) -> None:
        self.image_token_id = int(config.image_token_id)
        self.boi_token_id = int(config.boi_token_id)
        self.feature_size = image_feature_size(config)
        self.image_size = config.vision_config.image_size

    @property
    def placeholder_token_id(self) -> int:
        return self.boi_token_id

    @functools.cached_property
    def _image_sequence(self) -> list[int]:
        """The ids a ``<start_of_image>`` of a token-id prompt becomes (the processor's
        ``full_image_sequence``: ``\\n\\n<start_of_image>``, the soft tokens, ``<end_of_image>\\n\\n``)."""
        ids = self.hf.tokenizer(self.hf.full_image_sequence, add_special_tokens=False)["input_ids"]
        return [int(t) for t in ids]

    def _check_pan_and_scan(self) -> None:
        if getattr(self.hf.image_processor, "do_pan_and_scan", False):
            raise ValueError("Gemma 3 Pan & Scan (do_pan_and_scan=True in the image processor "
                             "config) is not supported; set it to false in "
                             "preprocessor_config.json: each image is then one view.")

    def process(self, prompt: Union[str, Sequence[int]], images,
                mm_kwargs: Optional[dict] = None) -> tuple[list[int], list[MultiModalFeature]]:
        extra = pixel_kwargs(self.check_mm_kwargs(mm_kwargs))
        images = as_image_list(images)
        self.check_count(len(images))
        self._check_pan_and_scan()
        if isinstance(prompt, str):
            boi = self.hf.boi_token
            if prompt.count(boi) != len(images):
                raise ValueError(f"The prompt has {prompt.count(boi)} {boi} for {len(images)} "
                                 f"image(s); put one {boi} in the prompt where each image goes.")
            out = self._run(lambda: self.hf(text=prompt, images=images, return_tensors="np", **extra))
            ids = [int(t) for t in out["input_ids"][0]]
        else:
            out = self._run(lambda: self.hf.image_processor(images=images, return_tensors="np", **extra))
            ids = self._expand_boi(list(prompt), len(images))
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        if pixels.shape[0] != len(images) or tuple(pixels.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"The model's image processor gives {tuple(pixels.shape)} pixels for "
                             f"{len(images)} image(s) but the vision tower takes one "
                             f"{self.image_size}x{self.image_size} view each; the checkpoint's "
                             "processor config does not match its config.json.")
        lengths = [self.feature_size] * len(images)
        spans = self._spans(ids, lengths)
        return ids, [MultiModalFeature.from_pixels(p, start, n)
                     for p, start, n in zip(pixels, spans, lengths)]

    def expand_chat_ids(self, ids: list[int], tokenizer) -> list[int]:
        """A chat prompt's ids (the template's ``<start_of_image>`` once per image) expanded as
        HF's processor expands the rendered text: each ``<start_of_image>`` replaced by the
        full image sequence in the text, which is then tokenized whole (its newlines may merge
        with the text's), without special tokens when the text starts with BOS."""
        text = tokenizer.decode(ids, skip_special_tokens=False)
        text = text.replace(self.hf.boi_token, self.hf.full_image_sequence)
        bos = getattr(self.hf.tokenizer, "bos_token", None)
        out = self.hf.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))
        return [int(t) for t in out["input_ids"]]

    def _expand_boi(self, ids: list[int], num_images: int) -> list[int]:
        """Token ids with one ``<start_of_image>`` per image and no soft tokens -> each one
        the full image sequence; ids already expanded stay as they are."""
        soft = ids.count(self.image_token_id)
        if soft == num_images * self.feature_size:
            return ids
        if soft or ids.count(self.boi_token_id) != num_images:
            raise ValueError(self._count_error(soft, [self.feature_size] * num_images))
        out: list[int] = []
        for t in ids:
            out.extend(self._image_sequence if t == self.boi_token_id else (t,))
        return out

    def _count_error(self, count: int, lengths: list[int]) -> str:
        return (f"The prompt has {count} image soft tokens (id {self.image_token_id}) for "
                f"{len(lengths)} image(s); put one <start_of_image> (id {self.boi_token_id}) per "
                f"image in the prompt, or pass the processor's expanded ids ({lengths[0]} soft "
                "tokens an image, between <start_of_image> and <end_of_image>).")
