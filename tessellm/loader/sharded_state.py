"""Sharded state: each rank's loaded weights saved as they sit in memory, read back by that rank.

vLLM's ``save_sharded_state`` / ``load_format="sharded_state"``: a tensor-parallel rank writes
its own slices of the model (``model-rank-{rank}-part-{part}.safetensors``, ``max_size`` bytes
a part at most), and a later start with the same parallel layout has each rank read only its
own files straight into its already-sharded parameters: no whole checkpoint read, no slicing.

Invariant: a rank's files hold every tensor of its ``model.state_dict()`` once; a tensor that
shares storage with another (a tied LM head and embedding) is stored under the
lexicographically smallest of the names that cover the same memory, and filled through it.

Each file's safetensors metadata records the layout it was saved from (``tensor_parallel_size``,
``pipeline_parallel_size``, ``rank``, ``dtype``, ``quantization``), so a mismatch is refused by
name before any tensor is copied. Quantized layers keep their packed segments as stored
(``loader/sharded_quant.py``: int8 and fp8; other schemes refused).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
from typing import Optional

import torch

DEFAULT_PATTERN = "model-rank-{rank}-part-{part}.safetensors"


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the tensors whose memory another one (or an equal one with a smaller
    name) covers: tied weights stored once."""
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, t in state.items():
        if t.numel():
            groups.setdefault((t.device, t.untyped_storage().data_ptr()), []).append((name, t))
    kept = {name: t for name, t in state.items() if not t.numel()}
    for group in groups.values():
        for name, t in group:
            span = _span(t)
            if not any(_covers(_span(t2), span, t2.is_contiguous(), name2 < name)
                       for name2, t2 in group if name2 != name):
                kept[name] = t
    return kept


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``t`` reaches in its storage: ``[first, end)``."""
    last = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _covers(outer: tuple[int, int], inner: tuple[int, int], contiguous: bool, smaller: bool) -> bool:
    """Whether a tensor over ``outer`` stands for one over ``inner``: strictly more memory, or
    the same memory under a smaller name."""
    if not contiguous or outer[0] > inner[0] or outer[1] < inner[1]:
        return False
    return outer != inner or smaller


def save_sharded_state(model: torch.nn.Module, path: str, rank: int, layout: dict,
                       pattern: Optional[str] = None, max_size: Optional[int] = None) -> list[str]:
    """Write this rank's tensors under ``path``; returns the files written. ``layout``:
    ``tensor_parallel_size``, ``pipeline_parallel_size``, ``dtype`` and ``quantization`` (a
    scheme, or None), kept in each file's metadata. ``max_size``: bytes a file at most (a
    tensor larger than that gets a file alone); each part is written once full, so host memory
    holds one part at a time. This rank's files of an earlier save there are removed first."""
    from safetensors.torch import save_file

    pattern = pattern or DEFAULT_PATTERN
    check_pattern(pattern)
    if max_size is not None and max_size <= 0:
        raise ValueError(f"save_sharded_state: max_size must be a positive number of bytes, got {max_size}.")
    os.makedirs(path, exist_ok=True)
    for stale in rank_files(path, pattern).get(rank, []):
        os.remove(stale)  # an earlier save's parts: the load reads every part of the rank
    meta = {k: str(v) for k, v in layout.items()} | {"rank": str(rank), "format": "tessellm-sharded-state"}
    if layout.get("quantization") is not None:
        from tessellm.loader.sharded_quant import QUANTIZED_KEY, describe

        meta[QUANTIZED_KEY] = describe(model)
    files: list[str] = []

    def write(tensors: dict) -> None:
        files.append(os.path.join(path, pattern.format(rank=rank, part=len(files))))
        save_file(tensors, files[-1], metadata=meta)

    part, size = {}, 0
    rename = as_loaded(model)
    for name, t in unique_tensors({rename(n): t for n, t in model.state_dict().items()}).items():
        nbytes = t.numel() * t.element_size()
        if part and max_size is not None and size + nbytes > max_size:
            write(part)
            part, size = {}, 0
        part[name] = t.detach().to("cpu").contiguous()
        size += nbytes
    if part or not files:
        write(part)
    return files


def as_loaded(model: torch.nn.Module):
    """A name in ``model`` (a tensor's or a module's) -> the same one in the model as loaded.
    An engine with ``enable_lora`` wraps layers after the load (``lora/layers.py``: a wrapper's
    ``base`` is the loaded layer), so ``x.base.weight`` is saved as ``x.weight``: the files are
    the base model's, and load with or without ``enable_lora`` (adapters are not part of them)."""
    wrappers = {name for name, m in model.named_modules() if getattr(m, "wraps_base", False)}

    def rename(name: str) -> str:
        if not wrappers:
            return name
        kept: list[str] = []
        for part in name.split("."):
            if not (part == "base" and ".".join(kept) in wrappers):
                kept.append(part)
        return ".".join(kept)

    return rename


def check_pattern(pattern: str) -> None:
    if "{rank}" not in pattern or "{part}" not in pattern:
        raise ValueError(f"Sharded-state file pattern {pattern!r} must name both {{rank}} and "
                         f"{{part}}, e.g. {DEFAULT_PATTERN!r}.")


def extra_config_pattern(extra: Optional[object], load_format: str) -> Optional[str]:
    """The file pattern in vLLM's ``model_loader_extra_config`` (a dict or its JSON;
    ``{"pattern": "..."}``, as ``save_sharded_state(pattern=...)`` wrote), None when it names
    none (the default pattern). ``pattern`` is the only key read, and only by
    ``load_format="sharded_state"``: anything else is refused by name."""
    if isinstance(extra, str):
        try:
            extra = json.loads(extra) if extra.strip() else None
        except json.JSONDecodeError as exc:
            raise ValueError(f"model_loader_extra_config is not valid JSON ({exc}): {extra!r}; "
                             'give e.g. \'{"pattern": "%s"}\'.' % DEFAULT_PATTERN) from None
    if not extra:
        return None
    if not isinstance(extra, dict):
        raise ValueError(f"model_loader_extra_config must be a dict (or its JSON), got {extra!r}; "
                         f"give e.g. {{'pattern': {DEFAULT_PATTERN!r}}}.")
    other = sorted(set(extra) - {"pattern"})
    if other:
        raise ValueError(f"model_loader_extra_config key(s) {other} are not supported by tessellm: "
                         "it reads only 'pattern' (the sharded-state file name, with "
                         "load_format='sharded_state'); leave the others out.")
    if load_format != "sharded_state":
        raise ValueError(f"model_loader_extra_config's 'pattern' is read by load_format='sharded_state' "
                         f"only (load_format is {load_format!r}); add load_format='sharded_state' "
                         "or leave the pattern out.")
    pattern = extra["pattern"]
    if not isinstance(pattern, str):
        raise ValueError(f"model_loader_extra_config's 'pattern' must be a string, got {pattern!r}.")
    check_pattern(pattern)
    return pattern


def rank_files(path: str, pattern: str = DEFAULT_PATTERN) -> dict[int, list[str]]:
    """The sharded-state files under ``path``, by rank (parts in order)."""
    check_pattern(pattern)
    regex = re.compile(re.escape(pattern).replace(r"\{rank\}", r"(?P<rank>\d+)")
                       .replace(r"\{part\}", r"(?P<part>\d+)") + "$")
    found: dict[int, list[tuple[int, str]]] = {}
    for file in glob.glob(os.path.join(path, "*")):
        m = regex.match(os.path.basename(file))
        if m:
            found.setdefault(int(m["rank"]), []).append((int(m["part"]), file))
    return {r: [f for _, f in sorted(parts)] for r, parts in sorted(found.items())}


def load_sharded_state(model: torch.nn.Module, path: str, rank: int, layout: dict,
                       pattern: Optional[str] = None) -> None:
    """Fill ``model`` (built for this rank) from its own files under ``path``, in place."""
    from safetensors import safe_open

    by_rank = rank_files(path, pattern or DEFAULT_PATTERN)
    if not by_rank:
        raise FileNotFoundError(
            f"load_format='sharded_state': {path} holds no sharded-state files "
            f"({(pattern or DEFAULT_PATTERN).format(rank='N', part='M')}); write them with "
            "llm.llm_engine.engine_core.save_sharded_state(path=...) first (files saved with "
            "another pattern: give it as model_loader_extra_config={'pattern': ...}), or load "
            "the checkpoint with load_format='auto'.")
    world = layout["tensor_parallel_size"] * layout["pipeline_parallel_size"]
    if len(by_rank) != world or rank not in by_rank:
        raise ValueError(f"load_format='sharded_state': {path} holds files of {len(by_rank)} "
                         f"rank(s) (ranks {sorted(by_rank)}), but this engine has {world} "
                         f"(tensor_parallel_size={layout['tensor_parallel_size']}, "
                         f"pipeline_parallel_size={layout['pipeline_parallel_size']}); start it "
                         "with the layout the state was saved from.")
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, framework="pt")) for f in by_rank[rank]]
        where = {}
        for file, h in zip(by_rank[rank], handles):
            _check_layout(file, h.metadata() or {}, layout)
            where.update({name: (file, h) for name in h.keys()})
        if layout.get("quantization") is not None:
            from tessellm.loader.sharded_quant import QUANTIZED_KEY, rebuild

            rebuild(model, (handles[0].metadata() or {}).get(QUANTIZED_KEY),
                    lambda name: _saved(where, name, path, rank), path)
        state = unique_tensors(model.state_dict())
        for name, (file, h) in where.items():
            _copy_into(state, name, h.get_tensor(name), file)
    seen = set(where)
    missing = sorted(set(state) - seen)
    if missing:
        raise ValueError(f"load_format='sharded_state': rank {rank}'s files in {path} lack "
                         f"{len(missing)} of the model's tensors, e.g. {missing[:3]}; were they "
                         "saved from this model with the same options?")


def _saved(where: dict, name: str, path: str, rank: int) -> torch.Tensor:
    if name not in where:
        raise ValueError(f"load_format='sharded_state': rank {rank}'s files in {path} lack "
                         f"{name!r}, which their description of the quantized layers names; "
                         "were they all copied?")
    return where[name][1].get_tensor(name)


def _check_layout(file: str, meta: dict, layout: dict) -> None:
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "dtype", "quantization"):
        if key in meta and meta[key] != str(layout[key]):
            raise ValueError(f"load_format='sharded_state': {os.path.basename(file)} was saved with "
                             f"{key}={meta[key]}, this engine has {key}={layout[key]}; start it "
                             f"with {key}={meta[key]}.")


def _copy_into(state: dict, name: str, tensor: torch.Tensor, file: str) -> None:
    target = state.get(name)
    if target is None:
        raise ValueError(f"load_format='sharded_state': {os.path.basename(file)} holds tensor "
                         f"{name!r}, which this model does not have; was it saved from another "
                         "model or with other options (quantization, LoRA)?")
    if target.shape != tensor.shape or target.dtype != tensor.dtype:
        raise ValueError(f"load_format='sharded_state': tensor {name!r} in "
                         f"{os.path.basename(file)} is {tuple(tensor.shape)} {tensor.dtype}, the "
                         f"model's is {tuple(target.shape)} {target.dtype}; load it with the dtype "
                         "and options it was saved with.")
    with torch.no_grad():
        target.copy_(tensor)
