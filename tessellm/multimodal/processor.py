"""Front end: a prompt and its images -> the prompt's token ids with each image's placeholder
expanded, and one ``MultiModalFeature`` per image (preprocessed pixels, span, hash).

The model's HF processor does the work (``AutoProcessor``: LlavaProcessor = a tokenizer that
expands ``<image>`` to the image's feature count + CLIPImageProcessor: resize, crop, rescale,
normalize; LlavaNextProcessor: the same over anyres tiles, a count that depends on the image's
size), so the pixels and counts are exactly what transformers would feed the model. LLaVA-NeXT's
per-image count is tessellm's own (``llava_next.image_feature_size``, the rows the model packs),
checked at first use against the processor's settings; a checkpoint whose processor is another
class keeps that class's own count. A prompt
given as token ids may carry the placeholder once per image (expanded here, image k's to its
own count) or already expanded (as the processor's output); any other count is refused,
naming the expected one.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Optional, Sequence, Union

import numpy as np

from tessellm.multimodal.inputs import MultiModalFeature


def _image_types():
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("Image inputs need Pillow; pip install pillow (or tessellm[vision]).") from None
    return Image.Image


def has_images(data) -> bool:
    """Whether ``multi_modal_data`` holds an image, a video or an audio clip (None or empty
    lists: a text prompt)."""
    if data is None:
        return False
    if not isinstance(data, dict) or set(data) - {"image", "video", "audio"}:
        raise ValueError("multi_modal_data must be a dict with an 'image' entry (a PIL image "
                         "or a list of them), a 'video' entry (frames, or a list of videos) "
                         "and/or an 'audio' entry ((waveform, sampling_rate), or a list of "
                         "them); other modalities are not supported.")
    return any(given(data.get(k)) for k in ("image", "video", "audio"))


def given(items) -> bool:
    if items is None:
        return False
    if isinstance(items, (list, tuple)) and not items:
        return False
    return True


def as_image_list(images) -> list:
    """``multi_modal_data["image"]``: one PIL image or a list of them."""
    image_cls = _image_types()
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    for i, item in enumerate(items):
        if not isinstance(item, image_cls):
            raise ValueError(f"multi_modal_data['image'][{i}] is a {type(item).__name__}; give "
                             "PIL.Image.Image objects (one, or a list).")
    return items


# HF image-processor arguments that change only the pixel values (rescale, normalize, RGB
# conversion): every family's front end passes them through (``pixel_kwargs``)
PIXEL_KEYS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def pixel_kwargs(kwargs: Optional[dict]) -> dict:
    """The ``PIXEL_KEYS`` of a checked ``mm_processor_kwargs``, their values checked (a bad one:
    a ValueError naming the key), as HF's image processor takes them."""
    out = {k: v for k, v in (kwargs or {}).items() if k in PIXEL_KEYS}
    for key, value in out.items():
        if key.startswith("do_") and not isinstance(value, bool):
            raise ValueError(f"mm_processor_kwargs {key} must be true or false, got {value!r}.")
        if key == "rescale_factor" and not (_number(value) and value > 0):
            raise ValueError(f"mm_processor_kwargs rescale_factor must be a positive number, got {value!r}.")
        if key in ("image_mean", "image_std"):
            values = value if isinstance(value, list) else [value]
            if len(values) not in (1, 3) or not all(_number(v) for v in values) or \
                    (key == "image_std" and any(v <= 0 for v in values)):
                raise ValueError(f"mm_processor_kwargs {key} must be a number or 3 numbers (one per RGB "
                                 f"channel{', each > 0' if key == 'image_std' else ''}), got {value!r}.")
            out[key] = [float(v) for v in values] * (3 if len(values) == 1 else 1)
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ImageProcessor:
    """One per front end; the HF processor is loaded on first use. LLaVA's here; another
    family's front end subclasses it and reads its own fields in ``_read_config``."""

    takes_videos = False  # the Qwen2-VL family's front end takes videos too
    # vLLM's per-request mm_processor_kwargs this family's front end reads (``process``'s
    # ``mm_kwargs``): every family the pixel-value keys (``PIXEL_KEYS``: passed to HF's image
    # processor as they are; they change the pixels, never the sizes or placeholder counts)
    mm_kwargs_keys: tuple = PIXEL_KEYS

    def check_mm_kwargs(self, kwargs) -> dict:
        """A request's ``mm_processor_kwargs``: a dict of the keys this family reads, else a
        ValueError naming them."""
        if kwargs is None:
            return {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"mm_processor_kwargs must be an object, got {type(kwargs).__name__}.")
        unknown = sorted(set(kwargs) - set(self.mm_kwargs_keys))
        if unknown:
            takes = (f"it takes {', '.join(self.mm_kwargs_keys)}" if self.mm_kwargs_keys else
                     "it processes its inputs with the checkpoint's preprocessor settings")
            raise ValueError(f"mm_processor_kwargs {', '.join(map(repr, unknown))} not supported for "
                             f"{type(self.config).__name__.replace('Config', '')}: {takes}.")
        return dict(kwargs)

    def check_default_mm_kwargs(self, kwargs: dict) -> None:
        """``--mm-processor-kwargs`` at start-up: the keys (and a family's values) as a
        request's are checked, so a bad default fails the start, not every request."""
        pixel_kwargs(self.check_mm_kwargs(kwargs))

    def __init__(self, model_path: str, max_images: int, max_videos: int = 0):
        from transformers import AutoConfig

        self.model_path = model_path
        self.max_images = max_images
        self.max_videos = max_videos
        self.config = AutoConfig.from_pretrained(model_path)
        self._read_config(self.config)

    def _read_config(self, config) -> None:
        """The model's image token and per-image sizes from its ``config.json``."""
        from tessellm.models.llava import image_feature_size, image_token_id

        self.image_token_id = image_token_id(config)
        # LLaVA-NeXT (anyres): the count depends on the image's size (``_lengths``)
        self.anyres = bool(getattr(config, "image_grid_pinpoints", None))
        self.feature_size = None if self.anyres else image_feature_size(config)
        self.image_size = config.vision_config.image_size

    @functools.cached_property
    def hf(self):
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(self.model_path)
        except Exception as exc:  # noqa: BLE001 - any failure means the same: no usable processor
            raise ValueError(f"The model at {self.model_path} has no usable image processor "
                             f"(processor_config.json / preprocessor_config.json): {exc}") from None

    @functools.cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path)

    @functools.cached_property
    def images(self):
        """The HF image processor alone, for a front end that does the processor object's
        token expansion itself (Qwen2-VL's and Pixtral's processors need torchvision)."""
        return auto_image_processor(self.model_path)

    @property
    def placeholder_token_id(self) -> int:
        """The token a prompt (and the chat template) writes once per image: the image token
        itself here; Gemma 3's ``<start_of_image>``, which the processor expands."""
        return self.image_token_id

    def expand_chat_ids(self, ids: list[int], tokenizer) -> list[int]:
        """A rendered chat prompt's ids (the placeholder once per image) as ``process`` takes
        them: unchanged here (``process`` expands the placeholders); Gemma 3 expands the
        decoded text as HF's processor does."""
        return ids

    @property
    def chat_template(self):
        """The processor's chat template (llava-hf keeps it there, not in the tokenizer)."""
        return getattr(self.hf, "chat_template", None)

    def check_without_images(self, ids: Sequence[int]) -> None:
        """A prompt that comes without images must not hold image placeholders."""
        if self.image_token_id in ids:
            raise ValueError(f"The prompt has image placeholder tokens (id {self.image_token_id}) "
                             "but no image; pass the images in multi_modal_data (or image_url "
                             "parts), or drop the placeholders.")

    def check_count(self, num_images: int) -> None:
        if num_images and self.max_images == 0:
            from tessellm.multimodal.text_only import refuse_images

            raise refuse_images(self.model_path)
        if num_images > self.max_images:
            raise ValueError(f"The prompt has {num_images} images, over the limit of "
                             f"{self.max_images} per prompt; raise it with "
                             f"--limit-mm-per-prompt '{{\"image\": {num_images}}}'.")

    def check_audio_count(self, num_audios: int) -> None:
        if num_audios:
            raise ValueError(f"The model at {self.model_path} takes no audio inputs "
                             "(input_audio / audio_url parts, multi_modal_data['audio']); "
                             "Qwen2-Audio does.")

    def check_video_count(self, num_videos: int) -> None:
        if not num_videos:
            return
        if not self.takes_videos:
            raise ValueError(f"The model at {self.model_path} takes no video inputs (video_url "
                             "parts, multi_modal_data['video']); the Qwen2/2.5/3-VL families do. "
                             "Send images (frames as separate images) instead.")
        if num_videos > self.max_videos:
            raise ValueError(f"The prompt has {num_videos} video(s), over the limit of "
                             f"{self.max_videos} per prompt; raise it with "
                             f"--limit-mm-per-prompt '{{\"video\": {num_videos}}}'.")

    def process(self, prompt: Union[str, Sequence[int]], images,
                mm_kwargs: Optional[dict] = None) -> tuple[list[int], list[MultiModalFeature]]:
        extra = pixel_kwargs(self.check_mm_kwargs(mm_kwargs))
        images = as_image_list(images)
        self.check_count(len(images))
        if isinstance(prompt, str):
            out = self._run(lambda: self.hf(text=prompt, images=images, return_tensors="np", **extra))
            ids = [int(t) for t in out["input_ids"][0]]
        else:
            out = self._run(lambda: self.hf.image_processor(images=images, return_tensors="np", **extra))
            ids = None
        pixels, sizes = self._pixels(out, len(images))
        lengths = self._lengths(sizes, len(images))
        if ids is None:
            ids = self._expand(list(prompt), lengths)
        spans = self._spans(ids, lengths)
        return ids, [MultiModalFeature.from_pixels(p, start, n, size)
                     for p, start, n, size in zip(pixels, spans, lengths, sizes)]

    def _pixels(self, out, num_images: int) -> tuple[list[np.ndarray], list]:
        """Each image's pixels (LLaVA-NeXT: its tiles, without the batch's padding tiles) and
        its original (height, width) (None for LLaVA-1.5)."""
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"The model's image processor gives {tuple(pixels.shape[-2:])} images "
                             f"but its vision tower takes {self.image_size}x{self.image_size}; "
                             "the checkpoint's processor config does not match its config.json.")
        if not self.anyres:
            return list(pixels), [None] * num_images
        from tessellm.models.llava_next import grid_shape

        sizes = [[int(v) for v in size] for size in out["image_sizes"]]
        tiles = [rows * cols + 1 for rows, cols in (grid_shape(s, self.config) for s in sizes)]
        return [p[:n] for p, n in zip(pixels, tiles)], sizes

    def _lengths(self, sizes: list, num_images: int) -> list[int]:
        """Placeholder tokens of each image (LLaVA-NeXT: by its size, ``_anyres_count``)."""
        if not self.anyres:
            return [self.feature_size] * num_images
        if self._anyres_count == "own":
            from tessellm.models.llava_next import image_feature_size

            return [image_feature_size(size, self.config) for size in sizes]
        counts = self._run(lambda: self.hf._get_num_multimodal_tokens(image_sizes=sizes))
        return [int(n) for n in counts.num_image_tokens]

    @functools.cached_property
    def _anyres_count(self) -> str:
        """Who counts a LLaVA-NeXT image's placeholders: "own" (``image_feature_size``) for
        transformers' LlavaNextProcessor, once its settings are checked to be the config's
        (else the processor would expand ``<image>`` to a count the model does not produce);
        "processor" for another processor class that says it can count (its own rule, through
        its ``_get_num_multimodal_tokens``). Any other processor is refused."""
        from transformers import LlavaNextProcessor

        hf = self.hf
        if type(hf) is LlavaNextProcessor:
            _check_llava_next_processor(hf, self.config)
            return "own"
        if callable(getattr(hf, "_get_num_multimodal_tokens", None)):
            return "processor"
        raise ValueError(f"The model's processor is a {type(hf).__name__}, which tessellm cannot "
                         "count LLaVA-NeXT image tokens for; save the checkpoint with "
                         "transformers' LlavaNextProcessor.")

    @staticmethod
    def _run(call):
        try:
            return call()
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad image or prompt: the caller's error
            raise ValueError(f"The image processor could not process the input: {exc}") from None

    def _expand(self, ids: list[int], lengths: list[int], token_id: Optional[int] = None) -> list[int]:
        """Token ids with one placeholder per image: image k's becomes ``lengths[k]`` of them.
        ``token_id``: another placeholder than the image token (Qwen2-VL's video pad)."""
        token = self.image_token_id if token_id is None else token_id
        count = ids.count(token)
        if count == sum(lengths):
            return ids
        if count != len(lengths):
            raise ValueError(self._token_count_error(count, lengths, token))
        out: list[int] = []
        k = 0
        for t in ids:
            if t == token:
                out.extend([t] * lengths[k])
                k += 1
            else:
                out.append(t)
        return out

    def _spans(self, ids: list[int], lengths: list[int], token_id: Optional[int] = None) -> list[int]:
        """The first index of each image's run of ``lengths[k]`` placeholders (in order)."""
        token = self.image_token_id if token_id is None else token_id
        where = [i for i, t in enumerate(ids) if t == token]
        if len(where) != sum(lengths):
            raise ValueError(self._token_count_error(len(where), lengths, token))
        starts, first = [], 0
        for k, n in enumerate(lengths):
            s = where[first]
            if where[first + n - 1] != s + n - 1:
                what = "image" if token == self.image_token_id else "video"
                raise ValueError(f"The placeholders of {what} {k} are not one run of {n} "
                                 f"tokens; keep each {what}'s placeholder tokens together.")
            starts.append(s)
            first += n
        return starts

    def _token_count_error(self, count: int, lengths: list[int], token: int) -> str:
        if token == self.image_token_id:
            return self._count_error(count, lengths)
        return self._video_count_error(count, lengths)

    def _video_count_error(self, count: int, lengths: list[int]) -> str:
        raise NotImplementedError  # only a front end that takes videos passes another token

    def _count_error(self, count: int, lengths: list[int]) -> str:
        each = (f"the image's {lengths[0]} feature tokens" if len(set(lengths)) == 1
                else f"its image's feature tokens: {', '.join(map(str, lengths))}")
        return (f"The prompt has {count} image placeholder tokens (id {self.image_token_id}) for "
                f"{len(lengths)} image(s); put one <image> per image in the prompt (each stands "
                f"for {each}), or {sum(lengths)} when passing expanded token ids.")


def _check_llava_next_processor(hf, config) -> None:
    """Refuses a LlavaNextProcessor whose count would differ from the model's features: other
    grid pinpoints, patch size or class-token bookkeeping than config.json's (the tile size is
    checked on the pixels, ``ImageProcessor._pixels``)."""
    found = {"image_grid_pinpoints": [list(p) for p in hf.image_processor.image_grid_pinpoints],
             "patch_size": hf.patch_size,
             "vision_feature_select_strategy": hf.vision_feature_select_strategy,
             "num_additional_image_tokens": hf.num_additional_image_tokens}
    want = {"image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
            "patch_size": config.vision_config.patch_size,
            "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    wrong = [f"{k} {found[k]!r} (the model's: {want[k]!r})" for k in want if found[k] != want[k]]
    if wrong:
        raise ValueError("The checkpoint's LlavaNextProcessor does not match its config.json: "
                         + "; ".join(wrong) + ". Save the processor with the model's settings.")


@functools.lru_cache(maxsize=4)
def image_processor(model_path: str, max_images: int, max_videos: int = 0) -> ImageProcessor:
    from transformers import AutoConfig

    from tessellm.multimodal.gemma3_inputs import Gemma3ImageInputs, is_gemma3_mm
    from tessellm.multimodal.llama4_inputs import Llama4ImageInputs, is_llama4_mm
    from tessellm.multimodal.mistral3_inputs import Mistral3ImageInputs, is_mistral3
    from tessellm.multimodal.qwen2_vl_inputs import Qwen2VLImageInputs, is_qwen2_vl

    config = AutoConfig.from_pretrained(model_path)
    if is_qwen2_vl(config):
        return Qwen2VLImageInputs(model_path, max_images, max_videos)
    if is_mistral3(config):
        return Mistral3ImageInputs(model_path, max_images)
    if is_gemma3_mm(config):
        return Gemma3ImageInputs(model_path, max_images)
    if is_llama4_mm(config):
        return Llama4ImageInputs(model_path, max_images)
    return ImageProcessor(model_path, max_images)


@functools.lru_cache(maxsize=4)
def auto_image_processor(model_path: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_path)
    except Exception as exc:  # noqa: BLE001 - any failure means the same: no usable processor
        raise ValueError(f"The model at {model_path} has no usable image processor "
                         f"(preprocessor_config.json): {exc}") from None


def saved_chat_template(model_path: str) -> Optional[str]:
    """The processor's chat template saved beside the model (``chat_template.jinja`` or
    ``chat_template.json``), for a front end that does not load the HF processor object."""
    for name in ("chat_template.jinja", "chat_template.json"):
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            with open(path) as f:
                text = f.read()
            return json.loads(text).get("chat_template") if name.endswith(".json") else text
    return None


def adopt_chat_template(tokenizer, info) -> None:
    """A vision model whose tokenizer has no chat template (llava-hf keeps it in the
    processor's chat_template.json): the tokenizer takes the processor's, so chat works."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) or not info.mm_limits:
        return
    try:
        template = get_processor(info).chat_template
    except ValueError:
        return
    if template:
        tokenizer.chat_template = template


def text_only_error(model_path: str) -> ValueError:
    return ValueError(f"The model {model_path} is text-only: it does not take images or audio. "
                      "Remove the image / audio inputs, or serve a vision-language model (LLaVA, "
                      "Qwen2-VL) or an audio-language model (Qwen2-Audio).")


def get_processor(info) -> ImageProcessor:
    """The front end's image processor for the engine described by ``info`` (EngineInfo);
    raises ``text_only_error`` for a model that takes no images."""
    if "audio" in info.mm_limits:  # Qwen2-Audio: the audio front end, same interface
        from tessellm.multimodal.qwen2_audio_inputs import audio_processor

        return audio_processor(info.model_path, info.mm_limits["audio"])
    limit = info.mm_limits.get("image")
    if limit is None:
        raise text_only_error(info.model_path)
    return image_processor(info.model_path, limit, info.mm_limits.get("video", 0))
