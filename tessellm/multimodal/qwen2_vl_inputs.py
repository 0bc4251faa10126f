"""Front end of Qwen2-VL / Qwen2.5-VL images: a prompt and its images -> token ids with each
``<|image_pad|>`` expanded to its image's token count, and one ``MultiModalFeature`` per image
(its flattened patches, span, ``(t, h, w)`` grid, hash).

The HF image processor (``Qwen2VLImageProcessor``, from the checkpoint's
``preprocessor_config.json``) resizes each image to a multiple of ``patch * merge`` pixels
within ``min_pixels`` / ``max_pixels`` and flattens it into patches; an image of grid
``(t, h, w)`` takes ``t * h * w / merge^2`` placeholder tokens (``Qwen2VLProcessor`` expands
the same way). The expansion is done here over the tokenizer's ids, not by the HF processor
object, which also needs a video processor (torchvision) that image inputs never use.

Videos (Qwen2-VL, Qwen2.5-VL): each ``<|video_pad|>`` expands to its video's
``t * h * w / merge^2`` tokens. transformers' ``Qwen2VLVideoProcessor`` needs torchvision, so
its steps are done here over the image processor (``_video_patches``)::

    frames [T, H, W, 3]  --image processor, frame by frame-->  each resized (Pillow, bicubic,
                         within the video config's min / max pixels), rescaled, normalized
    pad T to a multiple of temporal_patch_size (repeat the last frame), pair the frames:
    patches [T / 2 * h * w, 3 * 2 * p * p]   (grid step, merge block, row, col; channel, frame,
                                               y, x: the video processor's layout)
    grid (T / 2, h, w)

A still image is a 2-frame video of itself to the tower (the image processor repeats it), so
a video of two equal frames has the image's exact patches (tested). Qwen2.5-VL's temporal
positions step by ``tokens_per_second * temporal_patch_size / fps`` per grid step
(``MultiModalFeature.time_interval``); Qwen2-VL's by 1. Qwen3-VL writes each frame pair after
its time, each its own span (``_timestamped``).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional, Sequence, Union

import numpy as np

from tessellm.multimodal.inputs import MultiModalFeature
from tessellm.multimodal.processor import (PIXEL_KEYS, ImageProcessor, pixel_kwargs, given, as_image_list,
                                           auto_image_processor, saved_chat_template)

ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                 "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")


def is_qwen2_vl(hf_config) -> bool:
    return any(a in ARCHITECTURES for a in getattr(hf_config, "architectures", None) or ())


VIDEO_ARCHITECTURES = ARCHITECTURES
TIMESTAMPED = ARCHITECTURES[2:]  # Qwen3-VL: a video is its frame pairs, each after its time


def takes_videos(hf_config) -> bool:
    return any(a in VIDEO_ARCHITECTURES for a in getattr(hf_config, "architectures", None) or ())


def video_refusal() -> ValueError:
    return ValueError("This checkpoint's config has no video_token_id, so it takes no videos; "
                      "send images, or frames as separate images.")


def max_image_tokens(model_path: str) -> int:
    """Placeholder tokens of the biggest image the processor makes (``max_pixels`` in patches
    of ``patch * merge`` pixels a side)."""
    processor = auto_image_processor(model_path)
    factor = processor.patch_size * processor.merge_size
    return _max_pixels(processor) // (factor * factor)


def _min_pixels(processor) -> int:
    size = getattr(processor, "size", None) or {}
    value = size.get("shortest_edge") or size.get("min_pixels") or getattr(processor, "min_pixels", None)
    return int(value or 1)


def _max_pixels(processor) -> int:
    size = getattr(processor, "size", None) or {}
    value = size.get("longest_edge") or size.get("max_pixels") or getattr(processor, "max_pixels", None)
    if not value:
        raise ValueError("The model's image processor config has no max_pixels (size.longest_edge); "
                         "is preprocessor_config.json complete?")
    return int(value)


class Qwen2VLImageInputs(ImageProcessor):
    """``ImageProcessor``'s interface (``process``, ``check_count``, ``image_token_id``) for
    Qwen2-VL; the placeholder expansion and span checks are the base class's.
    ``mm_processor_kwargs`` (vLLM's, per request): ``min_pixels`` / ``max_pixels`` of each
    image's resize, ``max_pixels`` at most the checkpoint's (the encoder budget is sized by it)."""

    mm_kwargs_keys = ("min_pixels", "max_pixels", *PIXEL_KEYS)

    def _read_config(self, config) -> None:
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = getattr(config, "video_token_id", None)
        self.merge = int(config.vision_config.spatial_merge_size)
        self.takes_videos = takes_videos(config) and self.video_token_id is not None
        self.timestamped = config.architectures[0] in TIMESTAMPED
        self.vision_start = getattr(config, "vision_start_token_id", None)
        self.vision_end = getattr(config, "vision_end_token_id", None)
        # Qwen2.5-VL: temporal positions per second of video (None: Qwen2-VL, one per step)
        self.tokens_per_second = getattr(config.vision_config, "tokens_per_second", None)
        if "Qwen2VL" in config.architectures[0]:
            self.tokens_per_second = None

    @property
    def chat_template(self) -> Optional[str]:
        """The processor's chat template (``chat_template.jinja`` / ``.json``) for a tokenizer
        that has none."""
        return saved_chat_template(self.model_path)

    def check_without_images(self, ids: Sequence[int]) -> None:
        super().check_without_images(ids)
        self._check_no_video_pads(ids)

    def _check_no_video_pads(self, ids: Sequence[int]) -> None:
        if self.video_token_id is None or self.video_token_id not in ids:
            return
        if not self.takes_videos:
            raise video_refusal()
        raise ValueError(f"The prompt has video placeholder tokens (<|video_pad|>, id "
                         f"{self.video_token_id}) but no video; pass the video in "
                         "multi_modal_data['video'] (or a video_url part), or drop the "
                         "placeholders.")

    def process(self, prompt: Union[str, Sequence[int]], images,
                videos=None, mm_kwargs: Optional[dict] = None) -> tuple[list[int], list[MultiModalFeature]]:
        size = self._image_size(mm_kwargs)
        images = as_image_list(images) if images else []
        self.check_count(len(images))
        if isinstance(prompt, str):
            ids = [int(t) for t in self.tokenizer(prompt)["input_ids"]]
        else:
            ids = list(prompt)
        features: list[MultiModalFeature] = []
        if given(videos):
            if mm_kwargs:  # HF's processor gives them to its video processor too: not done here
                raise ValueError(f"mm_processor_kwargs {', '.join(map(repr, sorted(mm_kwargs)))} apply to "
                                 f"images only for {type(self.config).__name__.replace('Config', '')} "
                                 "here; send the video without them (its frames are sized by the "
                                 "checkpoint's video processor settings).")
            ids, features = self._process_videos(ids, videos)
        else:
            self._check_no_video_pads(ids)
        if not images:
            if self.image_token_id in ids:
                super().check_without_images(ids)
            return ids, features
        extra = {**pixel_kwargs(mm_kwargs), **({} if size is None else {"size": size})}
        out = self._run(lambda: self.images(images=images, return_tensors="np", **extra))
        grids = [[int(v) for v in g] for g in out["image_grid_thw"]]
        patches = np.asarray(out["pixel_values"], dtype=np.float32)
        counts = [t * h * w for t, h, w in grids]
        if sum(counts) != patches.shape[0]:
            raise ValueError(f"The image processor gave {patches.shape[0]} patches for grids "
                             f"{grids}; its config does not match the model.")
        lengths = [n // (self.merge * self.merge) for n in counts]
        ids = self._expand(ids, lengths)
        spans = self._spans(ids, lengths)
        if features:  # the videos' placeholders moved with the images' expansion
            starts = self._spans(ids, [f.length for f in features], self.video_token_id)
            for f, start in zip(features, starts):
                f.offset = start
        bounds = np.cumsum([0] + counts)
        ours = [MultiModalFeature.from_pixels(patches[bounds[k]:bounds[k + 1]], start, n,
                                              grid_thw=grid)
                for k, (start, n, grid) in enumerate(zip(spans, lengths, grids))]
        return ids, sorted(ours + features, key=lambda f: f.offset)

    def check_default_mm_kwargs(self, kwargs: dict) -> None:
        self._image_size(kwargs)
        pixel_kwargs(kwargs)

    def _image_size(self, mm_kwargs: Optional[dict]) -> Optional[dict]:
        """The image processor's ``size`` with a request's ``min_pixels`` / ``max_pixels``
        (None: the checkpoint's as it is)."""
        kwargs = self.check_mm_kwargs(mm_kwargs)
        if not kwargs:
            return None
        ceiling = _max_pixels(self.images)
        size = {"shortest_edge": _min_pixels(self.images), "longest_edge": ceiling}
        for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            value = kwargs.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"mm_processor_kwargs {key} must be a positive integer (pixels), got {value!r}.")
            size[edge] = value
        if size["longest_edge"] > ceiling:
            raise ValueError(f"mm_processor_kwargs max_pixels {size['longest_edge']} is over this "
                             f"checkpoint's max_pixels {ceiling}, which sizes the engine's encoder "
                             "budget; give at most that.")
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(f"mm_processor_kwargs min_pixels {size['shortest_edge']} is over max_pixels "
                             f"{size['longest_edge']}; give min_pixels <= max_pixels.")
        return size

    # -- videos ----------------------------------------------------------------------------

    def _process_videos(self, ids: list[int], videos) -> tuple[list[int], list[MultiModalFeature]]:
        """The prompt's video pads expanded (before any image's: expansion keeps their
        order) and one feature per video."""
        from tessellm.multimodal.video import as_video_list

        if not self.takes_videos:
            raise video_refusal()
        videos = as_video_list(videos)
        self.check_video_count(len(videos))
        done = [self._video_patches(v.frames) for v in videos]
        if self.timestamped:
            return self._timestamped(ids, videos, done)
        lengths = [t * h * w // (self.merge * self.merge) for _, (t, h, w) in done]
        ids = self._expand(ids, lengths, self.video_token_id)
        spans = self._spans(ids, lengths, self.video_token_id)
        tp = self.images.temporal_patch_size
        return ids, [MultiModalFeature.from_pixels(
            patches, start, n, grid_thw=grid, modality="video",
            time_interval=(1.0 if self.tokens_per_second is None
                           else self.tokens_per_second * tp / v.fps))
            for v, (patches, grid), start, n in zip(videos, done, spans, lengths)]

    def _timestamped(self, ids: list[int], videos, done) -> tuple[list[int], list[MultiModalFeature]]:
        """Qwen3-VL: each video's ``<|vision_start|><|video_pad|><|vision_end|>`` (or a bare
        pad) becomes, per temporal step (frame pair), its time and its own span::

            <0.2 seconds><|vision_start|><|video_pad|> x h*w/m^2<|vision_end|><1.2 seconds>...

        (HF's ``Qwen3VLProcessor``: the time is the mean of the pair's frame times, index /
        fps). Each step is its own feature of grid ``(1, h, w)``: the tower attends within a
        frame pair and HF's ``get_rope_index`` splits a video's grid per step, so a step is
        encoded and positioned as an image. The times are tokenized apart from the prompt
        (equal to HF's text-level expansion where a special token or whitespace precedes the
        video, as chat templates write it)."""
        if ids.count(self.video_token_id) != len(videos):
            raise ValueError(self._video_count_error(ids.count(self.video_token_id),
                                                     [t * h * w // self.merge ** 2
                                                      for _, (t, h, w) in done]))
        tp = int(self.images.temporal_patch_size)
        out: list[int] = []
        k = 0
        i = 0
        while i < len(ids):
            if ids[i] != self.video_token_id:
                out.append(ids[i])
                i += 1
                continue
            wrapped = (out and out[-1] == self.vision_start and i + 1 < len(ids)
                       and ids[i + 1] == self.vision_end)
            if wrapped:  # the template's wrapper: each step brings its own
                out.pop()
            out.extend(self._step_ids(videos[k], done[k][1], tp))
            k += 1
            i += 2 if wrapped else 1
        features = []
        for (patches, (t, h, w)) in done:
            n = h * w
            for step in range(t):
                features.append(MultiModalFeature.from_pixels(
                    patches[step * n:(step + 1) * n], 0, n // self.merge ** 2,
                    grid_thw=[1, h, w], modality="video"))
        starts = self._spans(out, [f.length for f in features], self.video_token_id)
        for f, start in zip(features, starts):
            f.offset = start
        return out, features

    def _step_ids(self, video, grid, tp: int) -> list[int]:
        t, h, w = grid
        count = len(video.frames)
        times = [i / video.fps for i in range(count)] + [(count - 1) / video.fps] * (t * tp - count)
        ids: list[int] = []
        for step in range(t):
            when = (times[step * tp] + times[step * tp + tp - 1]) / 2
            ids += self.tokenizer(f"<{when:.1f} seconds>", add_special_tokens=False)["input_ids"]
            ids += [self.vision_start] + [self.video_token_id] * (h * w // self.merge ** 2)
            ids.append(self.vision_end)
        return ids

    def _video_patches(self, frames: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """``[T, H, W, 3]`` uint8 frames -> (patches ``[t * h * w, 3 * tp * p * p]``, grid
        ``[t, h, w]``) in the video processor's layout (module docstring)."""
        from PIL import Image

        proc = self.images
        tp, p = int(proc.temporal_patch_size), int(proc.patch_size)
        pil = [Image.fromarray(f) for f in frames]
        out = self._run(lambda: proc(images=pil, return_tensors="np", **self._video_size))
        grid = [int(v) for v in out["image_grid_thw"][0]]
        n = grid[1] * grid[2]  # patches of one frame
        per_frame = np.asarray(out["pixel_values"], dtype=np.float32)
        per_frame = per_frame.reshape(len(pil), n, -1, tp, p, p)
        per_frame = per_frame[:, :, :, 0]  # the processor repeats a still image tp times
        if len(pil) % tp:
            pad = np.repeat(per_frame[-1:], tp - len(pil) % tp, axis=0)
            per_frame = np.concatenate([per_frame, pad])
        t = per_frame.shape[0] // tp
        steps = per_frame.reshape(t, tp, n, -1, p, p).transpose(0, 2, 3, 1, 4, 5)
        return np.ascontiguousarray(steps.reshape(t * n, -1)), [t, grid[1], grid[2]]

    @functools.cached_property
    def _video_size(self) -> dict:
        """The video processor's pixel range (``video_preprocessor_config.json``: its
        ``size`` or min / max_pixels); none saved: the image processor's, as transformers
        builds a Qwen2-VL video processor from ``preprocessor_config.json``."""
        path = os.path.join(self.model_path, "video_preprocessor_config.json")
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            cfg = json.load(f)
        size = dict(cfg.get("size") or {})
        lo = cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
        hi = cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        return {"size": {"shortest_edge": int(lo), "longest_edge": int(hi)}} if lo and hi else {}

    def _video_count_error(self, count: int, lengths: list[int]) -> str:
        return (f"The prompt has {count} video placeholder tokens (<|video_pad|>, id "
                f"{self.video_token_id}) for {len(lengths)} video(s); put one "
                "<|vision_start|><|video_pad|><|vision_end|> per video in the prompt, or "
                f"{sum(lengths)} (each video's own count: {', '.join(map(str, lengths))}) when "
                "passing expanded token ids.")

    def _count_error(self, count: int, lengths: list[int]) -> str:
        return (f"The prompt has {count} image placeholder tokens (<|image_pad|>, id "
                f"{self.image_token_id}) for {len(lengths)} image(s); put one "
                "<|vision_start|><|image_pad|><|vision_end|> per image in the prompt, or "
                f"{sum(lengths)} (each image's own count: {', '.join(map(str, lengths))}) when "
                "passing expanded token ids.")
