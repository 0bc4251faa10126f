"""``MultiModalFeature``: one image (or video, or audio clip) of a request, as it travels from the front end to the
runner (and, msgpack-encoded, between processes): its preprocessed pixels, where its
placeholder tokens sit in the prompt, and a hash of its content.

    prompt:   USER: <img> <img> <img> <img> \\n What ... ASSISTANT:
                    ^offset                  ^offset + length
    hash:     sha256 of the preprocessed pixels (dtype, shape, bytes; and the original size
              where the model's features depend on it): equal images hit the
              prefix cache, different ones never share a block that covers a placeholder.

Plain data (ints, a string, bytes): no tensors, so the scheduler and the block manager stay
torch-free and a worker process is only ever handed numbers and bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


@dataclass
class MultiModalFeature:
    offset: int  # prompt index of its first placeholder token
    length: int  # placeholder tokens: the features the encoder gives for it
    identifier: str  # content hash (hex): prefix-cache key and encoder-cache key
    data: bytes = field(repr=False)  # the preprocessed pixels, C order
    shape: list[int] = field(default_factory=list)  # e.g. [3, 336, 336]
    dtype: str = "float32"
    modality: str = "image"
    # [height, width] of the image before preprocessing, for models whose features depend on
    # it (LLaVA-NeXT unpads its tile grid to the aspect ratio); None for LLaVA-1.5
    image_size: Optional[list[int]] = None
    # (t, h, w) patch grid of a variable-resolution image (Qwen2-VL: ``pixels`` are its
    # ``t*h*w`` flattened patches); None for fixed-size towers
    grid_thw: Optional[list[int]] = None
    # [rows, cols] of the tiles an image is cut into (Llama 4: ``pixels`` are its tiles, the
    # grid's and a global view); None for other models
    tile_grid: Optional[list[int]] = None
    # A video (``modality`` "video", Qwen2-VL family): M-RoPE temporal positions per temporal
    # grid step (Qwen2.5-VL: ``tokens_per_second * seconds per grid``; Qwen2-VL: 1.0)
    time_interval: Optional[float] = None
    # An audio clip (``modality`` "audio", Qwen2-Audio): its mel frames that hold the clip (the
    # rest of ``data``'s window is padding the encoder masks); None for images and videos
    audio_frames: Optional[int] = None

    @classmethod
    def from_pixels(cls, pixels: np.ndarray, offset: int, length: int,
                    image_size: Optional[Sequence[int]] = None,
                    grid_thw: Optional[Sequence[int]] = None,
                    tile_grid: Optional[Sequence[int]] = None, modality: str = "image",
                    time_interval: Optional[float] = None,
                    audio_frames: Optional[int] = None) -> "MultiModalFeature":
        pixels = np.ascontiguousarray(pixels)
        data = pixels.tobytes()
        size = None if image_size is None else [int(v) for v in image_size]
        grid = None if grid_thw is None else [int(v) for v in grid_thw]
        tiles = None if tile_grid is None else [int(v) for v in tile_grid]
        digest = hashlib.sha256()
        digest.update(f"{pixels.dtype.str}{pixels.shape}{size or ''}".encode())
        if grid is not None:
            digest.update(f"grid{grid}".encode())
        if tiles is not None:
            digest.update(f"tiles{tiles}".encode())
        if modality != "image":  # a 2-frame still video's patches are its image's: apart by
            digest.update(f"{modality}{time_interval}".encode())  # positions (time_interval)
        if audio_frames is not None:
            digest.update(f"frames{int(audio_frames)}".encode())
        digest.update(data)
        return cls(offset, length, digest.hexdigest(), data, list(pixels.shape), str(pixels.dtype),
                   modality=modality, image_size=size, grid_thw=grid, tile_grid=tiles,
                   time_interval=None if time_interval is None else float(time_interval),
                   audio_frames=None if audio_frames is None else int(audio_frames))

    @property
    def end(self) -> int:
        return self.offset + self.length

    def pixels(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape)

    def to_dict(self) -> dict:
        return {"offset": self.offset, "length": self.length, "identifier": self.identifier,
                "data": self.data, "shape": list(self.shape), "dtype": self.dtype,
                "modality": self.modality, "image_size": self.image_size, "grid_thw": self.grid_thw,
                "tile_grid": self.tile_grid, "time_interval": self.time_interval,
                "audio_frames": self.audio_frames}

    @classmethod
    def from_dict(cls, d: dict) -> "MultiModalFeature":
        return cls(**d)


def encode_features(features: Optional[list[MultiModalFeature]]) -> Optional[list[dict]]:
    """For msgpack (engine process, workers): None stays None."""
    return None if not features else [f.to_dict() for f in features]


def decode_features(items: Optional[list]) -> list[MultiModalFeature]:
    return [f if isinstance(f, MultiModalFeature) else MultiModalFeature.from_dict(f)
            for f in items or ()]


def block_extra_keys(features: list[MultiModalFeature], start: int, end: int) -> tuple[str, ...]:
    """The hashes of the images whose placeholders overlap tokens ``[start, end)``: a block's
    prefix-cache key includes them (earlier images reach it through the parent hash)."""
    return tuple(f.identifier for f in features if f.offset < end and start < f.end)
