"""Safetensors checkpoints: one file or shards listed in ``model.safetensors.index.json``."""

from __future__ import annotations

import json
import os
from typing import Iterator

import torch
from safetensors import safe_open


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, s) for s in shards]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"No .safetensors weights in {model_dir}; pass load_format='dummy' "
                                "for random weights, or a directory holding the checkpoint.")
    from tessellm.loader.sharded_state import rank_files

    if sum(len(parts) for parts in rank_files(model_dir).values()) == len(files):
        raise ValueError(f"{model_dir} holds a sharded state (each rank's saved weights, "
                         "model-rank-N-part-M.safetensors), not a checkpoint; start it with "
                         "load_format='sharded_state' and the parallel layout it was saved from.")
    return [os.path.join(model_dir, f) for f in files]


def iter_safetensors_weights(model_dir: str, dtype: torch.dtype,
                             lazy: bool = False) -> Iterator[tuple[str, object]]:
    """Yield (name, tensor) one tensor at a time, cast to ``dtype`` (floats only).

    ``lazy``: yield ``LazyTensor`` handles instead, valid until the next item; the consumer reads
    the whole tensor (``materialize()``) or only a slice of it (``narrow``).
    """
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if lazy:
                    yield name, LazyTensor(f, name, dtype)
                    continue
                yield name, _cast(f.get_tensor(name), dtype)


class LazyTensor:
    """A checkpoint tensor not read yet. ``narrow`` reads just that slice from the file, so a
    tensor-parallel rank never holds a whole split weight."""

    def __init__(self, handle, name: str, dtype: torch.dtype):
        self._handle = handle
        self._slice = handle.get_slice(name)
        self.name = name
        self.shape = torch.Size(self._slice.get_shape())
        self._dtype = dtype

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if not 0 <= start <= start + length <= self.shape[dim]:
            raise ValueError(f"Slice [{start}, {start + length}) of dim {dim} is outside "
                             f"checkpoint tensor {self.name} of shape {tuple(self.shape)}.")
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return _cast(self._slice[tuple(index)], self._dtype)

    def materialize(self) -> torch.Tensor:
        return _cast(self._handle.get_tensor(self.name), self._dtype)

    @property
    def stored_dtype(self) -> str:
        """The dtype the file stores, as safetensors names it ("BF16", "U8", ...), unread."""
        return self._slice.get_dtype()

    def stored(self) -> torch.Tensor:
        """The whole tensor in its stored dtype, uncast: a tensor the model keeps in float32
        whatever it runs in (DeepSeek-V3's router bias, ``models/deepseek_v2.py``)."""
        return self._handle.get_tensor(self.name)


def _cast(tensor: torch.Tensor, dtype) -> torch.Tensor:
    """Floats to ``dtype``; None keeps the stored dtype (quantization tensors)."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
