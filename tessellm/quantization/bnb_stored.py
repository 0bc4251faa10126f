"""A bitsandbytes checkpoint's tensors gathered into one piece per quantized weight, as the loader
carries them: each stored ``<p>.weight`` with its state becomes one ``StoredBnb`` under the name
``<p>.weight``, so models that rename or cut checkpoint weights (Phi-3's fused ``qkv_proj`` and
``gate_up_proj`` cut into q, k, v / gate, up) move the state along with the codes::

    4-bit   <p>.weight (uint8 [N*K/2, 1]), <p>.weight.absmax, .quant_map,
            .quant_state.bitsandbytes__nf4|fp4 (JSON), [.nested_absmax, .nested_quant_map]
    8-bit   <p>.weight (int8 [N, K]), <p>.SCB ([N] row absmax), <p>.weight_format (0: row-major)

        -> ("<p>.weight", StoredBnb(Bnb4Weight | Int8Weight))

Cutting rows (``split_rows``, ``narrow`` for a column-parallel rank): a 4-bit part must start
on a block boundary of the flattened weight (``start * K`` a multiple of the block size: always
so in released models, K being a multiple of 64), else one absmax would cover two parts ->
refused naming the weight. Cutting input columns (a row-parallel rank): 8-bit freely (the row
scales stay whole); 4-bit in whole blocks of every row (``K``, the rank's first input and its
count multiples of the block size), as ``BnbMethod.shard_tensor`` checks::

    4-bit [N, K], blocks of 64 (K a multiple of 64): absmax viewed [N, K/64]
    rank r of T:  codes [:, r K/2T : (r+1) K/2T]   absmax [:, r K/64T : (r+1) K/64T]
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch

from tessellm.quantization.bnb import Bnb4Weight, quant_state, widen_absmax
from tessellm.quantization.packed import Int8Weight, PackedWeight
from tessellm.quantization.sharding import materialize

_FOUR_BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
BNB8_FORMATS = {0: "row"}  # weight_format values read here (bitsandbytes' FORMAT_TO_INT)


class StoredBnb:
    """One quantized weight of a bnb checkpoint (``seg``, on the CPU), named ``name``."""

    def __init__(self, name: str, seg: PackedWeight):
        self.name = name
        self.seg = seg

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.seg.out_features, inputs(self.seg)))

    def materialize(self) -> "StoredBnb":
        return self  # read already (``sharding.materialize``)

    def split_rows(self, sizes: list[int]) -> list["StoredBnb"]:
        """Consecutive runs of ``sizes`` output rows (a fused stored tensor's parts)."""
        if sum(sizes) != self.shape[0]:
            raise ValueError(f"Checkpoint tensor {self.name} has {self.shape[0]} rows, which the "
                             f"model cuts into parts of {sizes}; does the config match?")
        parts, start = [], 0
        for rows in sizes:
            parts.append(StoredBnb(self.name, rows_of(self.seg, start, start + rows, self.name)))
            start += rows
        return parts

    def split(self, sizes, dim: int = 0) -> list["StoredBnb"]:
        """``Tensor.split`` by rows, as families that cut fused tensors call it (Falcon)."""
        if dim != 0 or isinstance(sizes, int):
            raise self._unsupported(f"split({sizes!r}, dim={dim})")
        return self.split_rows(list(sizes))

    def chunk(self, parts: int, dim: int = 0) -> list["StoredBnb"]:
        if dim != 0 or self.shape[0] % parts:
            raise self._unsupported(f"chunk({parts}, dim={dim})")
        return self.split_rows([self.shape[0] // parts] * parts)

    def take_rows(self, index: torch.Tensor) -> "StoredBnb":
        """Rows ``index`` in that order (GPT-NeoX's per-head ``query_key_value`` cut into q, k
        and v: ``models/fused_qkv.rows_of_fused``). A 4-bit weight's rows must each be whole
        blocks (``K`` a multiple of the block size: its codes and absmaxes move by rows), else
        refused naming the weight."""
        seg, index = self.seg, index.long()
        if isinstance(seg, Int8Weight):
            return StoredBnb(self.name, Int8Weight(seg.qweight[index], seg.scales[:, index],
                                                   seg.group_size))
        n, k, bs = seg.out_features, seg.in_features, seg.blocksize
        if k % bs:
            raise ValueError(f"{self.name} (bitsandbytes 4-bit, {k} inputs a row, blocks of {bs} "
                             "flattened weights) is reordered by rows as this family's loader "
                             "cuts it per head, which needs each row to be whole blocks; load "
                             "the dense checkpoint (or with quantization='bitsandbytes').")
        absmax = seg.absmax.view(n, k // bs)[index].reshape(-1)
        return StoredBnb(self.name, Bnb4Weight(seg.qweight[index], absmax, seg.code, bs))

    def __getattr__(self, attr: str):
        """Any other tensor operation a family's loader tries: an AttributeError (``hasattr``
        stays False) saying why."""
        if attr.startswith("__") or attr in ("name", "seg"):
            raise AttributeError(attr)
        raise self._unsupported(attr)

    def _unsupported(self, what: str) -> AttributeError:
        return AttributeError(f"{self.name} is a bitsandbytes-quantized weight, which this model "
                              f"family's loader cuts with {what}; tessellm cuts bnb weights "
                              "only into runs of whole rows, so this family's bnb checkpoints "
                              "are not supported (load the dense checkpoint, or with "
                              "quantization='bitsandbytes' to quantize it on load).")

    def narrow(self, dim: int, start: int, size: int) -> "StoredBnb":
        """Rows (dim 0) or input columns (dim 1): a tensor-parallel rank's part. 4-bit columns
        must be whole blocks of every row (``K`` and ``start``, ``size`` multiples of the block
        size: ``BnbMethod.shard_tensor`` refuses other splits naming the layer)."""
        seg = self.seg
        if dim == 0:
            return StoredBnb(self.name, rows_of(seg, start, start + size, self.name))
        if isinstance(seg, Int8Weight):
            return StoredBnb(self.name, Int8Weight(seg.qweight[:, start:start + size].contiguous(),
                                                   seg.scales, size))
        n, k, bs = seg.out_features, seg.in_features, seg.blocksize
        assert k % bs == 0 and start % bs == 0 and size % bs == 0
        absmax = seg.absmax.view(n, k // bs)[:, start // bs:(start + size) // bs]
        return StoredBnb(self.name, Bnb4Weight(seg.qweight[:, start // 2:(start + size) // 2]
                                               .contiguous(), absmax.reshape(-1), seg.code, bs))


def dense_form(tensor):
    """A ``StoredBnb`` reaching a dense parameter (an MoE router, which bitsandbytes quantizes
    as it does every linear while tessellm keeps routers float): its dequantized float32
    weight; anything else as it is."""
    if not isinstance(tensor, StoredBnb):
        return tensor
    return tensor.seg.dequantize(torch.float32)


def inputs(seg: PackedWeight) -> int:
    """K of a bnb segment (4-bit codes are two a byte), an 8-bit one or a dense one."""
    if isinstance(seg, Bnb4Weight):
        return seg.in_features
    return (seg.weight if seg.kind == "dense" else seg.qweight).shape[1]


def rows_of(seg: PackedWeight, r0: int, r1: int, where: str) -> PackedWeight:
    """Rows ``r0:r1`` of a ``Bnb4Weight`` (refused where ``r0`` starts inside a block) or of a
    per-channel ``Int8Weight``."""
    if isinstance(seg, Int8Weight):
        return Int8Weight(seg.qweight[r0:r1].contiguous(), seg.scales[:, r0:r1].contiguous(),
                          seg.group_size)
    k, bs = seg.in_features, seg.blocksize
    if r0 * k % bs:
        raise ValueError(f"{where} (bitsandbytes 4-bit, {k} inputs a row, blocks of {bs} "
                         f"flattened weights) cannot be cut at row {r0}: one block's absmax would "
                         "cover two parts. tessellm cuts fused or tensor-parallel bnb 4-bit "
                         "weights only on block boundaries.")
    return Bnb4Weight(seg.qweight[r0:r1], seg.absmax[r0 * k // bs:-(-r1 * k // bs)], seg.code, bs)


def stored_weights(weights: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    """The checkpoint stream with each bnb-quantized ``<p>.weight`` and its state replaced by one
    ``("<p>.weight", StoredBnb)``, yielded once its parts are in (they sit next to it in a
    checkpoint); every other tensor passes through unread."""
    pending: dict[str, dict] = {}
    for name, tensor in weights:
        key, part = _piece(name)
        if part is None or (part == "weight" and not _codes(tensor)):
            yield name, tensor
            continue
        if part == "weight_format":
            _check_format(name, materialize(tensor))
            continue
        pieces = pending.setdefault(key, {})
        pieces[part] = materialize(tensor)
        seg = _complete(key, pieces)
        if seg is not None:
            del pending[key]
            yield key, StoredBnb(key, seg)
    if pending:
        key, pieces = next(iter(pending.items()))
        raise ValueError(f"The checkpoint's bitsandbytes weight {key} lacks "
                         f"{', '.join(_missing(pieces)) or 'its state'}; is it complete?")


def _piece(name: str) -> tuple[str, Optional[str]]:
    """``(the weight's name, which piece)`` of a checkpoint name, piece None for other tensors."""
    prefix, _, last = name.rpartition(".")
    if last == "weight":
        return name, "weight"
    if last in ("SCB", "weight_format"):
        return f"{prefix}.weight", last
    head, sep, tail = name.rpartition(".weight.")
    if sep and (tail in _FOUR_BIT or tail.startswith("quant_state.bitsandbytes__")):
        return f"{head}.weight", tail.partition(".")[0]
    return name, None


def _codes(tensor) -> bool:
    """A weight stored as 8-bit integers (bnb codes), asked without reading a lazy tensor."""
    stored = getattr(tensor, "stored_dtype", None)
    if stored is not None:
        return stored in ("U8", "I8")
    return materialize(tensor).dtype in (torch.uint8, torch.int8)


def _missing(pieces: dict) -> list[str]:
    weight = pieces.get("weight")
    if weight is not None and weight.dtype == torch.int8:
        return [] if "SCB" in pieces else ["SCB"]
    need = ["weight", "absmax", "quant_map", "quant_state"]
    absmax = pieces.get("absmax")
    if absmax is not None and absmax.dtype == torch.uint8:  # double quantization
        need += ["nested_absmax", "nested_quant_map"]
    if "SCB" in pieces:
        need = ["weight"]
    return [p for p in need if p not in pieces]


def _complete(key: str, pieces: dict) -> Optional[PackedWeight]:
    """The weight's segment once every piece is in, else None."""
    if _missing(pieces):
        return None
    q = pieces["weight"]
    if q.dtype == torch.int8:
        scb = pieces["SCB"].float().reshape(-1)
        if q.dim() != 2 or scb.numel() != q.shape[0]:
            raise ValueError(f"{key}: bnb 8-bit weight {tuple(q.shape)} with {scb.numel()} row "
                             "scales (SCB); is the checkpoint complete?")
        return Int8Weight(q.contiguous(), (scb / 127.0).reshape(1, -1), q.shape[1])
    where = key.removesuffix(".weight")
    state = quant_state(pieces["quant_state"], where)
    n, k = state["shape"]
    if q.numel() * 2 != n * k or k % 2:
        raise ValueError(f"{key} holds {q.numel()} bytes of bnb 4-bit codes, but its quant_state "
                         f"says shape {[n, k]}; is the checkpoint complete?")
    absmax, blocksize = widen_absmax(pieces, state, where), state["blocksize"]
    if absmax.numel() != -(-n * k // blocksize) or pieces["quant_map"].numel() != 16:
        raise ValueError(f"{key} has {absmax.numel()} absmax values and a quant_map of "
                         f"{pieces['quant_map'].numel()} entries, but its quant_state (shape "
                         f"{[n, k]}, blocksize {blocksize}) needs {-(-n * k // blocksize)} and 16; "
                         "is the checkpoint complete?")
    return Bnb4Weight(q.reshape(n, k // 2), absmax, pieces["quant_map"], blocksize)


def _check_format(name: str, fmt: torch.Tensor) -> None:
    if fmt.numel() != 1:
        raise ValueError(f"{name} holds {fmt.numel()} values where bitsandbytes writes one (the "
                         "8-bit layout, 0 for row-major); is the checkpoint complete? Save the "
                         "model again with a recent bitsandbytes.")
    value = int(fmt.reshape(-1)[0])
    if value not in BNB8_FORMATS:
        raise ValueError(f"{name} is {value}, a GPU-specific bitsandbytes 8-bit layout; tessellm "
                         "reads row-major (0) 8-bit checkpoints: save the model again with a "
                         "recent bitsandbytes.")
