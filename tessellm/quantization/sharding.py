"""Splitting pre-quantized checkpoint tensors over tensor-parallel ranks.

A column-parallel rank holds whole output rows of each logical weight; a row-parallel rank holds
a run of its input columns (``layers/linear.py``). ``TPSplit`` names that part in the
checkpoint's coordinates, and each scheme's ``shard_tensor`` cuts every tensor it stores to it,
so a rank's segments are exactly the matching rows or columns of the one-device model's::

    N outputs, K inputs; G = K / group; a split of rows n0.. (column) or columns k0.. (row)

    tensor                               column-parallel               row-parallel
    weight (dense, fp8)   [N, K]         rows n0..                     columns k0..
    bias                  [N]            n0..                          whole (added after the sum)
    fp8 weight_scale      [N] or [N, 1]  n0..                          whole
                          [] or [1]      whole (one shard's tensor)    whole
    AWQ  qweight          [K, N/8]       words n0/8..    (8 | n0, n)    rows k0..
         qzeros           [G, N/8]       words n0/8..                   groups k0/group..
         scales           [G, N]         n0..                          groups k0/group..
    GPTQ qweight          [K/8, N]       n0..                          words k0/8..
         qzeros, scales                  as AWQ                        as AWQ
         g_idx            [K]            whole                         k0.., minus k0/group
    GGUF blocks           [N, K/B words] rows n0..                     whole blocks k0/B..
    fp8_block weight_scale_inv [N/bn, K/bk] block rows n0/bn.. (bn | n0,  block columns k0/bk..
                                         or the rows in one block)

A row-parallel split must fall on group (int4) or block (GGUF: 32 weights, 256 for the K-quants)
boundaries: otherwise one group's scale would straddle two ranks. Such a split, an int4 split
inside a packed 8-column word, or a GPTQ act-order layer whose groups span ranks, is refused
with one sentence naming the layer. (One group over all of K, as per-channel int4 has, stays
whole on every rank: each rank's columns use the same scales.)

A fused layer's per-tensor fp8 scales (``weight_scale`` of q, k and v) are per logical shard, as
at T=1 (``int8_fp8.py``): each rank expands its shard's scale over its rows of that shard.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TPSplit:
    """The part of one logical weight ``[N, K]`` a tensor-parallel rank holds."""

    dim: int  # 0: output rows (column-parallel); 1: input columns (row-parallel)
    start: int  # first row (dim 0) or column (dim 1) of the logical weight
    size: int  # how many rows or columns
    tp_size: int  # ranks in the group (a row-parallel split is even: K = size * tp_size)


def materialize(tensor):
    """A lazily read checkpoint tensor (``LazyTensor``) read now; anything else as it is."""
    return tensor.materialize() if hasattr(tensor, "materialize") else tensor


def narrow(tensor, dim: int, start: int, size: int):
    """``tensor.narrow`` that reads only that part of a lazy checkpoint tensor."""
    return materialize(tensor.narrow(dim, start, size))


def dense(layer, name: str, tensor, split: TPSplit):
    """A dense (or fp8) ``weight [N, K]`` or ``bias [N]``: this rank's rows or columns."""
    if split.dim == 1 and name == "bias":
        return materialize(tensor)
    if name not in ("weight", "bias"):
        raise ValueError(f"{_where(layer, split)}: the checkpoint tensor {name!r} has no "
                         f"tensor-parallel split in a {layer.quant_method.name} layer; run it "
                         "with tensor_parallel_size=1.")
    return narrow(tensor, split.dim, split.start, split.size)


def fp8(layer, name: str, tensor, split: TPSplit):
    """fp8 ``weight`` as dense; per-channel ``weight_scale`` by rows; per-tensor values whole."""
    if name in ("weight", "bias"):
        return dense(layer, name, tensor, split)
    if split.dim == 1 or math.prod(tensor.shape) == 1:  # per output row, or one per tensor
        return materialize(tensor)
    return narrow(tensor, 0, split.start, split.size)  # per channel: [N] or [N, 1]


def fp8_block(layer, name: str, tensor, split: TPSplit, block: tuple[int, int]):
    """Block-wise fp8: the weight as dense, its ``weight_scale_inv`` by whole blocks. The rank's
    rows (column-parallel) or inputs (row-parallel) must start on a block boundary and end on
    one, or at the weight's end: a block's scale cannot be shared by two ranks' parts. Except
    rows that all lie inside one row block (a Mamba mixer's dt part: H / T rows of an H-row
    block): the rank keeps that block's scale row, which serves each of its rows as it did."""
    unit = block[split.dim]
    end = split.start + split.size
    inside = split.dim == 0 and split.start // unit == (end - 1) // unit
    if name == "weight" and not inside:
        _check_blocks(layer, split, block, end == tensor.shape[split.dim])
    if name != "weight_scale_inv":
        return dense(layer, name, tensor, split)
    covered = tensor.shape[split.dim] * unit  # rows or inputs the scales cover (>= the weight's)
    if not inside:
        _check_blocks(layer, split, block, end > covered - unit)  # the end in the last block
    first = split.start // unit
    return narrow(tensor, split.dim, first, -(-min(end, covered) // unit) - first)


def _check_blocks(layer, split: TPSplit, block: tuple[int, int], at_end: bool) -> None:
    unit = block[split.dim]
    if split.start % unit == 0 and ((split.start + split.size) % unit == 0 or at_end):
        return
    what = "output rows" if split.dim == 0 else "inputs"
    raise ValueError(f"{_where(layer, split)}: each rank would take {split.size} of its "
                     f"{what} (from {split.start}), which does not fall on the fp8 blocks of "
                     f"{block[0]}x{block[1]} (weight_block_size); use a tensor_parallel_size "
                     f"that leaves a multiple of {unit} {what} per rank (or "
                     "pipeline_parallel_size).")


def int4(layer, name: str, tensor, split: TPSplit, fmt: str, group_size: int):
    """AWQ (``fmt`` "awq") or GPTQ packed codes, zeros, scales and g_idx (table above)."""
    if name not in ("qweight", "qzeros", "scales", "g_idx"):
        return dense(layer, name, tensor, split)
    if split.dim == 0:
        if name == "g_idx":
            return materialize(tensor)
        if name == "scales" or (fmt == "gptq" and name == "qweight"):
            return narrow(tensor, 1, split.start, split.size)
        _check_words(layer, split)  # packed 8 output columns per int32
        return narrow(tensor, 1, split.start // 8, split.size // 8)
    k = split.size * split.tp_size
    group = k if group_size in (-1, 0) or group_size > k else group_size
    if group != k:  # (one group over all of K: every rank's columns use the same scales)
        _check_groups(layer, split, group, f"int4 groups of {group} inputs")
    if name == "qweight":
        if fmt == "awq":
            return narrow(tensor, 0, split.start, split.size)
        _check_groups(layer, split, 8, "8-row words of its GPTQ int4 packing")
        return narrow(tensor, 0, split.start // 8, split.size // 8)
    if name == "g_idx":
        return _local_g_idx(layer, narrow(tensor, 0, split.start, split.size), split, group)
    if group == k:
        return materialize(tensor)
    return narrow(tensor, 0, split.start // group, split.size // group)


def gguf_blocks(layer, name: str, tensor, split: TPSplit):
    """A ``GGUFQuantized`` tensor's rows, or whole blocks of every row; dense ones as dense."""
    if not hasattr(tensor, "qtype"):
        return dense(layer, name, tensor, split)
    import gguf

    rows, k = tensor.shape
    if split.dim == 0:
        data = tensor.data.narrow(0, split.start, split.size)
        shape = (split.size, k)
    else:
        block, block_bytes = gguf.GGML_QUANT_SIZES[tensor.qtype]
        _check_groups(layer, split, block, f"GGUF {tensor.qtype.name} blocks of {block} weights")
        data = tensor.data.narrow(1, split.start // block * block_bytes,
                                  split.size // block * block_bytes)
        shape = (rows, split.size)
    return dataclasses.replace(tensor, shape=shape, data=data.contiguous())


def _local_g_idx(layer, g_idx, split: TPSplit, group: int):
    """A row-parallel rank's g_idx, renumbered from its first group; every input row of the
    rank must belong to one of the rank's own groups (GPTQ act-order can scatter them)."""
    local = g_idx - split.start // group
    if bool(((local < 0) | (local >= max(split.size // group, 1))).any()):
        raise ValueError(f"{_where(layer, split)}: its GPTQ act-order (desc_act) groups of "
                         f"{group} inputs span several ranks' input columns, which this split "
                         "cannot serve; run it with tensor_parallel_size=1 or use a checkpoint "
                         "quantized without desc_act.")
    return local


def _check_groups(layer, split: TPSplit, unit: int, what: str) -> None:
    if split.start % unit or split.size % unit:
        k = split.size * split.tp_size
        raise ValueError(f"{_where(layer, split)}: each rank would take {split.size} of its {k} "
                         f"inputs, which does not fall on the {what}; use a "
                         f"tensor_parallel_size that splits {k} into multiples of {unit} "
                         "(or pipeline_parallel_size).")


def _check_words(layer, split: TPSplit) -> None:
    if split.start % 8 or split.size % 8:
        raise ValueError(f"{_where(layer, split)}: each rank's {split.size} output rows (from row "
                         f"{split.start}) do not fall on the 8-column words of the int4 packing; "
                         "use a tensor_parallel_size that leaves a multiple of 8 rows per rank.")


def _where(layer, split: TPSplit) -> str:
    return (f"{getattr(layer, 'quant_name', 'linear')} cannot be split over "
            f"tensor_parallel_size={split.tp_size}")
