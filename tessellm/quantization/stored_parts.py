"""A fused layer whose logical shards the checkpoint stores in one tensor (a Mamba2 mixer's
``in_proj``, a gated DeltaNet's ``in_proj_qkvz`` / ``in_proj_ba``): each stored tensor cut into
the pieces of each shard, whatever the scheme stores beside the weight, so the layer's
``load_shard`` can take them one shard at a time (and, under tensor parallelism, cut its rank's
rows of each, ``quantization/sharding.py``)::

    stored weight rows:   [ part 0: s0 | part 1: s1 | ... ]       groups=1
                          [ g0: s0 s1 .. | g1: s0 s1 .. | .. ]     groups=G (per key head)
    shard i gets          its rows of every group, in group order

    tensor                            each shard's piece
    weight, bias, per-row scale [N]   its rows
    per-tensor scale (one value)      the same value (a per-tensor fp8 checkpoint has one scale
                                      for the whole stored tensor; each shard keeps it)
    weight_scale_inv [N/bn, K/bk]     its rows of scale blocks: every part must start on a block
                                      of bn rows (the last may end short), else one block's scale
                                      would cover two parts -> refused naming the layer

AWQ / GPTQ int4 (``quantization/int4.py``) store the outputs as columns, so each part is a
range of columns of every group (one group's columns: all parts, one after another)::

    GPTQ qweight [K/8, N]     its columns
    AWQ  qweight [K, N/8]     its columns' words: 8 columns a word, so every part must start
    qzeros       [G, N/8]     (and end) on a multiple of 8 columns, else one word would hold
                              two parts -> refused naming the layer
    scales       [G, N]       its columns
    g_idx        [K]          the same one (the inputs are every part's)

Other stored tensors (GGUF blocks) have no such cut here and are refused with one sentence.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tessellm.quantization.sharding import materialize

_ROWS = ("weight", "bias", "weight_scale")  # a row each (a weight_scale may be per tensor)
_PER_TENSOR = ("weight_scale", "input_scale", "input_scale_ub")
_INT4 = ("qweight", "qzeros", "scales", "g_idx")


def split_stored(layer, name: str, tensor, sizes: list[int], groups: int = 1) -> list:
    """``tensor`` (checkpoint piece ``name`` of ``layer``, lazy or read) -> one piece per entry
    of ``sizes`` (each shard's rows per group; ``groups`` groups stored one after another)."""
    method = layer.quant_method
    block = getattr(method, "block", None)
    packing = getattr(method, "format", None) if name in _INT4 else None
    return split_rows(name, tensor, sizes, groups, block[0] if block else None,
                      getattr(layer, "quant_name", "linear"), packing)


def split_rows(name: str, tensor, sizes: list[int], groups: int = 1,
               block_rows: Optional[int] = None, where: str = "linear",
               packing: Optional[str] = None) -> list:
    """``split_stored`` without a layer: ``block_rows`` is the fp8 blocks' row count (bn) where
    the checkpoint is block-wise, ``packing`` the int4 format ("awq" | "gptq") of an int4
    checkpoint, ``where`` names the layer in errors."""
    tensor = materialize(tensor)
    if name in _PER_TENSOR and math.prod(tensor.shape) == 1:
        return [tensor] * len(sizes)
    if name in _ROWS:
        return _cut(tensor, list(sizes), groups)
    if name == "weight_scale_inv" and block_rows:
        return _cut(tensor, _block_rows(tensor, sizes, groups, block_rows, where), groups)
    if name in _INT4 and packing in ("awq", "gptq"):
        if name == "g_idx":
            return [tensor] * len(sizes)
        if name == "qzeros" or (name == "qweight" and packing == "awq"):
            sizes = _words(sizes, groups, packing, where)
        return [p.t() for p in _cut(tensor.t(), list(sizes), groups)]
    raise ValueError(f"Checkpoint tensor {where}.{name} cannot be cut into the {len(sizes)} "
                     "parts this layer stores in one tensor; load this model unquantized, with "
                     "fp8 (quantization='fp8', or an fp8 checkpoint), or from an AWQ or GPTQ "
                     "checkpoint.")


def _cut(tensor: torch.Tensor, sizes: list[int], groups: int) -> list[torch.Tensor]:
    if tensor.shape[0] != groups * sum(sizes):
        raise ValueError(f"A checkpoint tensor of shape {tuple(tensor.shape)} does not hold "
                         f"{groups} x {sum(sizes)} rows; the config does not match the weights.")
    if groups == 1:
        return list(tensor.split(sizes))
    rows = tensor.reshape(groups, sum(sizes), *tensor.shape[1:])
    return [p.reshape(-1, *tensor.shape[1:]) for p in rows.split(sizes, dim=1)]


def _words(sizes: list[int], groups: int, packing: str, where: str) -> list[int]:
    """Each part's int32 words of 8 packed output columns."""
    if any(size % 8 for size in sizes):
        raise ValueError(f"{where} stores parts of {sizes} outputs"
                         f"{f' in each of {groups} groups' if groups > 1 else ''} in one "
                         f"{packing.upper()} int4 tensor, but its words of 8 packed outputs would "
                         "each hold two parts; such a checkpoint leaves this layer unquantized "
                         "(store it in the model dtype), or load the unquantized model.")
    return [size // 8 for size in sizes]


def _block_rows(tensor, sizes: list[int], groups: int, bn: int, where: str) -> list[int]:
    """Scale rows of each part: ``size / bn``, the last part (one group) what is left."""
    ends_short = groups == 1
    if any(size % bn for size in (sizes[:-1] if ends_short else sizes)):
        raise ValueError(f"{where} stores parts of {sizes} rows"
                         f"{f' in each of {groups} groups' if groups > 1 else ''} in one "
                         f"block-wise fp8 weight, but its blocks of {bn} rows would each cover "
                         "two parts; such a checkpoint leaves this layer unquantized (store it "
                         "in the model dtype), or use quantization='fp8' on the dense model.")
    rows = [size // bn for size in sizes]
    if ends_short:
        rows[-1] = tensor.shape[0] - sum(rows[:-1])
    return rows


def checkpoint_block_rows(hf_config) -> Optional[int]:
    """The row count of a block-wise fp8 checkpoint's blocks (``weight_block_size[0]``), or
    None: for cutting its stored scales where no layer is at hand (a model's renames)."""
    qc = getattr(hf_config, "quantization_config", None) or {}
    block = (qc if isinstance(qc, dict) else qc.to_dict()).get("weight_block_size")
    return int(block[0]) if block else None


def checkpoint_packing(hf_config) -> Optional[str]:
    """"awq" or "gptq" for an int4 checkpoint (its packed tensors are cut by columns), else
    None: for a model's renames, where no layer is at hand."""
    qc = getattr(hf_config, "quantization_config", None) or {}
    method = str((qc if isinstance(qc, dict) else qc.to_dict()).get("quant_method", "")).lower()
    return method if method in ("awq", "gptq") else None
