"""AWQ and GPTQ int4 checkpoints (4 bits, group size 128 or any power of two, or per channel).

Checkpoint layouts (K inputs, N outputs, G = K / group), all packed 8 codes per int32, low
nibble first, ``w = (q - zero) * scale``::

    AWQ (GEMM)  qweight [K, N/8]  packed along N, nibble i holds column 8c + AWQ_ORDER[i]
                qzeros  [G, N/8]  same packing;  scales [G, N] fp16
    GPTQ        qweight [K/8, N]  packed along K, nibble i holds row 8r + i
                qzeros  [G, N/8]  packed along N in order; stores zero - 1 ("gptq" v1 format)
                scales  [G, N];   g_idx [K]: the group of each input row

Both become ``packed.Int4Weight`` (GPTQ's layout; offsets = -zero * scale, or a constant
zero_point when every zero is equal, as in symmetric GPTQ). GPTQ act-order (``desc_act``:
g_idx not ``k // group``) is served by sorting the rows by group once at load, so groups are
contiguous again, and gathering ``x[..., perm]`` at run time::

    g_idx = [1 0 1 0]  ->  perm = [1 3 0 2]  (stable argsort)  ->  sorted groups [0 0 1 1]

q, k, v (and gate, up) see the same input, hence the same Hessian and the same act-order
permutation; shards with equal ``perm`` are merged into one segment, others stay apart.
"""

from __future__ import annotations

import torch

from tessellm.quantization import sharding
from tessellm.quantization.base import QuantLinearMethod, dense_segment
from tessellm.quantization.packed import (Int4Weight, cat_segments, pack_int4, quantize_int4,
                                          unpack_int4)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i <- column AWQ_ORDER[i] of each 8
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # column j -> nibble AWQ_REVERSE[j]


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """``[R, N]`` codes -> AWQ int32 ``[R, N/8]`` (qweight and qzeros alike)."""
    r, n = q.shape
    return _pack_last(q.reshape(r, n // 8, 8)[..., list(AWQ_ORDER)])


def _pack_last(cols: torch.Tensor) -> torch.Tensor:
    """``[..., 8]`` codes -> int32 ``[...]`` with element i in nibble i."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=cols.device)
    word = (cols.to(torch.int64) << shifts).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 ``[R, N/8]`` -> codes ``[R, N]`` (uint8)."""
    shifts = torch.tensor(AWQ_REVERSE, dtype=torch.int32, device=packed.device) * 4
    return (torch.bitwise_right_shift(packed[..., None], shifts) & 0xF).reshape(
        packed.shape[0], -1).to(torch.uint8)  # (not `>>`: torch-xla, packed.unpack_int4)


def pack_gptq_zeros(z: torch.Tensor) -> torch.Tensor:
    """``[G, N]`` codes -> int32 ``[G, N/8]``, 8 consecutive columns per word."""
    return _pack_last(z.reshape(z.shape[0], -1, 8))


def unpack_gptq_zeros(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return (torch.bitwise_right_shift(packed[..., None], shifts) & 0xF).reshape(
        packed.shape[0], -1).to(torch.uint8)  # (not `>>`: torch-xla, packed.unpack_int4)


def act_order_perm(g_idx: torch.Tensor, group: int) -> torch.Tensor | None:
    """None when ``g_idx == k // group``; else the stable sort of rows by group (validated)."""
    k = g_idx.numel()
    seq = torch.arange(k, device=g_idx.device) // group
    g = g_idx.long()
    if torch.equal(g, seq):
        return None
    perm = torch.sort(g, stable=True).indices
    if not torch.equal(g[perm], seq):
        raise ValueError(f"GPTQ g_idx does not put exactly {group} input rows in each group; "
                         "this act-order layout is not supported.")
    return perm.to(torch.int32)


class Int4Method(QuantLinearMethod):
    """``config``: ``format`` ("awq" | "gptq"), ``group_size`` (-1: per channel),
    ``zero_offset`` (1 for GPTQ v1 checkpoints that store zero - 1, else 0). A layer the
    checkpoint left unquantized (``modules_to_not_convert``, GPTQ ``dynamic`` "-:" rules) stores
    a float ``weight``: kept as a dense segment (the model dtype), per shard."""

    accepts = ("qweight", "qzeros", "scales", "g_idx", "weight")

    def __init__(self, ops, config=None):
        super().__init__(ops, config)
        self.format = self.config["format"]
        self.name = self.format
        self.zero_offset = int(self.config.get("zero_offset", 0))

    def shard_tensor(self, layer, name, tensor, split):
        return sharding.int4(layer, name, tensor, split, self.format,
                             int(self.config.get("group_size", 128)))

    def _load(self, layer, name, tensor, shard, pieces):
        pieces[name] = tensor.to(layer.quant_device)

    def _missing(self, pieces):
        if "weight" in pieces:
            return []
        return [a for a in ("qweight", "qzeros", "scales") if a not in pieces]

    def _group(self, k: int) -> int:
        g = int(self.config.get("group_size", 128))
        return k if g in (-1, 0) or g > k else g

    def _finish(self, layer, pieces, rows):
        if "weight" in pieces:
            if "qweight" in pieces:
                raise ValueError(f"{layer.quant_name} has both a float weight and int4 qweight "
                                 "in the checkpoint; is it complete and consistent?")
            return dense_segment(pieces["weight"], layer)
        k = layer.input_size
        group = self._group(k)
        if self.format == "awq":
            q = unpack_awq(pieces["qweight"])  # [K, n]
            zeros = unpack_awq(pieces["qzeros"])
            perm = None
        else:
            q = unpack_int4(pieces["qweight"])
            zeros = unpack_gptq_zeros(pieces["qzeros"]).to(torch.int32) + self.zero_offset
            g_idx = pieces.get("g_idx")
            perm = act_order_perm(g_idx, group) if g_idx is not None else None
            if perm is not None:
                q = q[perm.long()]
        if q.shape[0] != k or zeros.shape[0] != k // group:
            raise ValueError(f"{layer.quant_name}: int4 tensors of shape {tuple(q.shape)} / "
                             f"{tuple(zeros.shape)} do not match {k} inputs in groups of {group}.")
        scales = pieces["scales"]
        if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            scales = scales.float()
        zeros = zeros.to(torch.int32)
        if bool((zeros == zeros.flatten()[0]).all()):
            return Int4Weight(pack_int4(q), scales.contiguous(), None, int(zeros.flatten()[0]),
                              group, perm)
        offsets = -(zeros.float() * scales.float())
        return Int4Weight(pack_int4(q), scales.contiguous(), offsets, 0, group, perm)

    def process_weights_after_loading(self, layer) -> None:
        """The base's (segments from the staged checkpoint pieces), then each int4 segment
        handed to the backend's optional ``QuantOps.prepare_int4`` (a load-time re-layout for
        its kernels; the checkpoint layout stays the segment's contract)."""
        super().process_weights_after_loading(layer)
        prepare = getattr(self.ops, "prepare_int4", None)
        if prepare is not None:
            for seg in layer.segments:
                if seg.kind == "int4":
                    prepare(seg)

    def _merge(self, segments):
        perms = [getattr(s, "perm", None) for s in segments]  # (a dense segment has none)
        if len(segments) > 1 and perms[0] is not None and all(
                p is not None and torch.equal(p, perms[0]) for p in perms):
            merged = cat_segments([_without_perm(s) for s in segments])
            if len(merged) == 1:
                merged[0].perm = perms[0]
                return merged
        return cat_segments(segments)

    def _quantize_shard(self, layer, w, shard):
        """Round-to-nearest int4 of dense rows, written in the checkpoint's own format (AWQ:
        asymmetric; GPTQ: symmetric unless the config says ``sym: false``)."""
        group = self._group(layer.input_size)
        sym = self.format == "gptq" and (self.config.get("checkpoint") or {}).get("sym", True)
        q, s, z = quantize_int4(w, group, symmetric=sym)
        if self.format == "awq":
            parts = {"qweight": pack_awq(q), "qzeros": pack_awq(z)}
        else:
            parts = {"qweight": pack_int4(q), "qzeros": pack_gptq_zeros(z - self.zero_offset)}
        parts["scales"] = s.to(torch.float16)
        for name, t in parts.items():
            self.load_weight(layer, name, t, shard)


def _without_perm(seg: Int4Weight) -> Int4Weight:
    return Int4Weight(seg.qweight, seg.scales, seg.offsets, seg.zero_point, seg.group_size)


def dequantized_int4_stream(weights, fmt: str, group_size: int, zero_offset: int, wanted):
    """Checkpoint tensors with each AWQ / GPTQ projection ``<p>`` for which ``wanted(<p>.weight)``
    holds turned into one dense float32 ``<p>.weight [N, K]`` (``(q - zero) * scale`` of its
    ``qweight``, ``qzeros``, ``scales``, by ``g_idx`` where given: act-order too): for layers
    that keep dense weights (DeepSeek's MLA projections). Each projection is yielded once its
    tensors are in (a GPTQ one also waits for its ``g_idx``, else comes at the end); everything
    else passes through."""
    from tessellm.quantization.sharding import materialize

    waiting: dict[str, dict] = {}
    for name, tensor in weights:
        prefix, _, attr = name.rpartition(".")
        if attr not in ("qweight", "qzeros", "scales", "g_idx") or not wanted(f"{prefix}.weight"):
            yield name, tensor
            continue
        parts = waiting.setdefault(prefix, {})
        parts[attr] = materialize(tensor)
        if len(parts) == (4 if fmt == "gptq" else 3):
            del waiting[prefix]
            yield f"{prefix}.weight", _dequantize_parts(parts, fmt, group_size, zero_offset)
    for prefix, parts in waiting.items():
        missing = [a for a in ("qweight", "qzeros", "scales") if a not in parts]
        if missing:
            raise ValueError(f"The checkpoint has no {prefix}.{missing[0]} for its int4 "
                             f"{prefix}; is it complete?")
        yield f"{prefix}.weight", _dequantize_parts(parts, fmt, group_size, zero_offset)


def _dequantize_parts(parts: dict, fmt: str, group_size: int, zero_offset: int) -> torch.Tensor:
    if fmt == "awq":
        q, z = unpack_awq(parts["qweight"]), unpack_awq(parts["qzeros"]).to(torch.int32)
    else:
        q = unpack_int4(parts["qweight"])
        z = unpack_gptq_zeros(parts["qzeros"]).to(torch.int32) + zero_offset
    k = q.shape[0]
    group = k if group_size in (-1, 0) or group_size > k else group_size
    rows = parts["g_idx"].long() if "g_idx" in parts else torch.arange(k) // group
    w = (q.float() - z[rows].float()) * parts["scales"].float()[rows]
    return w.t().contiguous()
