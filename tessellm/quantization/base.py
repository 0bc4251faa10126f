"""The shared skeleton of every quantized linear method, and what a backend must provide.

A scheme (int8, fp8, awq, gptq, gguf, bitsandbytes) decides how checkpoint tensors become
packed segments (``packed.py``); a backend decides how a segment is multiplied (``QuantOps``).
The plugin's ``tessellm_quant_method`` hook pairs them: ``make_quant_method(spec, ops)``.

Life of one quantized ``Linear`` (``layer``)::

    create_weights   layer.segments = []; staging dict for checkpoint pieces
    shard_tensor     tensor_parallel_size > 1: cuts each checkpoint tensor to this rank's part
    load_weight      once per checkpoint tensor: ("weight" | "qweight" | "weight_scale" | ...,
                     tensor, shard) -> staged per shard (shard None: the whole layer)
    process_weights_after_loading
                     checks every shard arrived, turns the staged pieces into packed segments,
                     merges neighbours of one layout, drops the staging
    apply            y = concat over segments of ops.<kind>_mm(x, segment) (+ bias)

Invariant: after ``process_weights_after_loading`` the layer holds its weight only as
``layer.segments`` buffers; nothing dense of the quantized weight stays in memory.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch
import torch.nn as nn

from tessellm.quantization import sharding
from tessellm.quantization.packed import (DenseWeight, Fp8Activation, Fp8Weight, Int4Weight,
                                          Int8Weight, PackedWeight, cat_segments)


@runtime_checkable
class QuantOps(Protocol):
    """The GEMMs a backend provides for packed segments. ``x``: ``[M, K]`` in the model dtype;
    returns ``[M, N]`` in x's dtype, plus ``bias`` when given. A backend lists the schemes it
    can run in ``schemes`` (a scheme needs the kinds its segments use)."""

    name: str
    schemes: frozenset

    def int8_mm(self, x: torch.Tensor, w: Int8Weight, bias=None) -> torch.Tensor: ...

    def int4_mm(self, x: torch.Tensor, w: Int4Weight, bias=None) -> torch.Tensor: ...

    def fp8_mm(self, x: torch.Tensor, w: Fp8Weight, bias=None) -> torch.Tensor:
        """W8A8: quantizes each row of x to fp8 (dynamic per-token scale) first."""

    # For the ``fp8_block`` scheme (listed in ``schemes``): ``fp8_block_mm(x, w, bias=None)``,
    # ``w`` a ``fp8_block.Fp8BlockWeight`` (e4m3 ``[N, K]``, a float32 scale per ``bn x bk``
    # block): the dequantized weight's product (W8A16, the reference) or W8A8 with x quantized
    # per token and group of ``bk`` (``fp8_block.w8a8_block_reference``, the Triton kernels).
    #
    # For the ``bitsandbytes`` scheme (listed in ``schemes``): ``bnb4_mm(x, w, bias=None)``,
    # ``w`` a ``bnb.Bnb4Weight`` (uint8 codes two a byte, a float32 absmax per block of the
    # flattened weight, the 16-entry code table): the dequantized weight's product
    # (``backends/reference/quant_ops.TorchQuantOps.bnb4_mm``, the oracle); bnb 8-bit
    # checkpoints use ``int8_mm``.
    #
    # Optional: ``fp8_mm_silu_and_mul(x, w, bias=None)``, ``silu_and_mul(fp8_mm(x, w, bias))``
    # for a stacked ``[gate; up]`` weight (``[M, 2I]`` -> ``[M, I]``, SiLU rounded to x's dtype
    # before the multiply), so a backend can put the activation in its GEMM's epilogue at
    # decode (the cuda one: ``gemv_x2.gemv_fp8_x2_silu_and_mul`` at one row). The oracle is
    # ``backends/reference/quant_ops.fp8_mm_silu_and_mul``; without it the MLP runs the two.
    #
    # Optional: ``fp8_mm_add_rms_norm(x, w, residual, norm_weight, eps, bias=None)``,
    # ``fused_add_rms_norm(fp8_mm(x, w, bias), residual, norm_weight, eps)`` -> ``(normed,
    # residual)``, so a backend can run the norm after the GEMM in one launch at batch-1
    # decode (the cuda one: ``gemv_x2.gemv_fp8_x2_then_add_rms_norm``, its last program;
    # asked only under ``TESSELLM_GEMV_NORM_EPILOGUE=1``). The oracle is
    # ``backends/reference/quant_ops.fp8_mm_add_rms_norm``.
    #
    # Optional: ``prepare_int4(w)``, called once per ``Int4Weight`` segment of an AWQ / GPTQ
    # layer after loading (``int4.Int4Method.process_weights_after_loading``): the backend may
    # attach codes re-laid for its kernels (the cuda one: ``w.tc_qweight``, the tensor-core
    # GEMM's layout, ``kernels/gemm/int4_tc.py``) and may then empty ``w.qweight`` to ``[0, N]``
    # (``Int4Weight.dequantize`` reads the re-laid codes then); plugin API 24.
    #
    # Optional, a pair (plugin API 24): ``fp8_mm_add_rms_norm_fold(x, w, residual, norm_weight,
    # bias=None)`` and ``fp8_mm_rms_scaled(x, w, sumsq, eps, bias=None, silu_and_mul=False)``,
    # ``FusedOps.linear_add_rms_norm_fold`` / ``linear_rms_scaled`` on the fp8 product (the
    # cuda one: ``gemv_fold.gemv_fp8_x2_*``, asked at one row under ``TESSELLM_NORM_FOLD2=1``).
    # The oracles are ``backends/reference/quant_ops.fp8_mm_add_rms_norm_fold`` and
    # ``fp8_mm_rms_scaled``.
    #
    # Optional, a pair (the fp8 activation fold): ``fp8_mm_prequantized(xa, w, bias=None)``,
    # ``fp8_mm``'s W8A8 product for an activation its producer already quantized per token
    # (``xa``: a ``packed.Fp8Activation``; returns ``[M, N]`` in ``xa.dtype``), and
    # ``fp8_w8a8_rows(rows) -> bool``, whether ``fp8_mm`` itself quantizes x per token at that
    # many rows (its W8A8 path: only there does a producer quantize for it). The oracle is
    # ``backends/reference/quant_ops.TorchQuantOps``' pair.


class QuantLinearMethod:
    """Base of every scheme's method. Subclasses implement ``_load`` and ``_finish``."""

    name = ""
    # attribute names a checkpoint may give this method ("bias" is handled here)
    accepts: tuple[str, ...] = ("weight",)
    ignores: tuple[str, ...] = ()  # accepted and dropped (e.g. static activation scales)

    def __init__(self, ops: QuantOps, config: Optional[dict] = None):
        self.ops = ops
        self.config = dict(config or {})
        if getattr(ops, "fp8_mm_silu_and_mul", None) is None:
            self.apply_silu_and_mul = None  # not offered (layers.linear.fused_silu_and_mul)
        if getattr(ops, "fp8_mm_add_rms_norm", None) is None:
            self.apply_add_rms_norm = None  # not offered (layers.linear.fused_linear_add_rms_norm)
        if getattr(ops, "fp8_mm_add_rms_norm_fold", None) is None:
            self.apply_add_rms_norm_fold = None  # not offered (layers.linear.fold_norm_out)
        if getattr(ops, "fp8_mm_rms_scaled", None) is None:
            self.apply_rms_scaled = None  # not offered (layers.linear.fold_norm_in)
        if getattr(ops, "fp8_mm_prequantized", None) is None:
            self.prequantized_dtype = None  # not offered (layers.linear.fp8_input_dtype)
            self.apply_prequantized = None

    # -- the QuantMethod protocol --------------------------------------------------------

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype) -> None:
        if not hasattr(layer, "output_sizes"):  # a bare module (tests, conformance suite)
            layer.input_size, layer.output_size, layer.output_sizes = input_size, output_size, [output_size]
        if not hasattr(layer, "bias"):
            layer.bias = None
        layer.quant_dtype = dtype or torch.get_default_dtype()  # the model's activation dtype
        layer.quant_device = torch.empty(0).device  # the device the model is being built on
        layer.quant_name = getattr(layer, "quant_name", "linear")  # set by the loader
        layer.quant_staged = {}  # shard -> {attr: tensor or packed}; None is the whole layer
        layer.segments = nn.ModuleList()

    def load_weight(self, layer: nn.Module, name: str, tensor, shard: Optional[int]) -> None:
        """Take one checkpoint tensor (``name``: its last name part) for output shard ``shard``."""
        if name == "bias":
            rows = _rows(layer, shard)
            _copy_checked(layer.bias.data[rows], tensor, f"{layer.quant_name}.bias")
            return
        if name in self.ignores:
            return
        if name not in self.accepts:
            raise ValueError(f"Checkpoint tensor {layer.quant_name}.{name} has no place in a "
                             f"{self.name} layer (it takes {', '.join(self.accepts)}); is the "
                             "quantization config right for these weights?")
        self._load(layer, name, tensor, shard, layer.quant_staged.setdefault(shard, {}))

    def shard_tensor(self, layer: nn.Module, name: str, tensor, split):
        """This tensor-parallel rank's part (``split``: a ``sharding.TPSplit``) of checkpoint
        tensor ``name`` (lazy, or read) of ``layer``, read now. Called before ``load_weight``
        (``Linear.local_slice``), only with tensor_parallel_size > 1. Default: a dense
        ``weight``/``bias`` by rows or columns; a scheme storing other tensors overrides it
        (``sharding.py``: each layout's split)."""
        return sharding.dense(layer, name, tensor, split)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        staged = layer.quant_staged
        shards = _shards(layer)
        if len(layer.output_sizes) == 1 and 0 in staged:  # a fused path loaded a single shard
            staged[None] = staged.pop(0)
        segments = []
        for shard in shards:
            pieces = staged.get(shard, {})
            missing = self._missing(pieces)
            if missing:
                what = f" shard {shard}" if shard is not None else ""
                raise ValueError(f"The checkpoint lacks {', '.join(missing)} for "
                                 f"{layer.quant_name}{what}; is it complete and the right "
                                 "architecture?")
            seg = self._finish(layer, pieces, _rows(layer, shard))
            if seg.out_features != _rows(layer, shard).stop - _rows(layer, shard).start:
                raise ValueError(f"{layer.quant_name}{'' if shard is None else f' shard {shard}'}"
                                 f" has {seg.out_features} output rows in the checkpoint, "
                                 "expected a different number; the config does not match.")
            segments.append(seg)
        layer.segments = nn.ModuleList(self._merge(segments))
        layer.quant_staged = {}

    def apply(self, layer: nn.Module, x: torch.Tensor, bias=None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        segs = layer.segments
        if len(segs) == 1:
            y = self._mm(x2, segs[0], bias)
        else:
            y = torch.cat([self._mm(x2, s, None) for s in segs], dim=-1)
            if bias is not None:
                y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor, bias=None):
        """The optional ``QuantMethod`` member: ``silu_and_mul(apply(layer, x, bias))`` for a
        stacked ``[gate; up]`` layer in one product where the backend's ``QuantOps`` offers it
        (``ops.fp8_mm_silu_and_mul``; without it this member is None) for the layer's weight
        (one fp8 segment); None where it does not (the caller runs ``apply``, then the
        activation). x is ``[M, K]``."""
        segs = layer.segments
        if len(segs) != 1 or segs[0].kind != "fp8" or x.dim() != 2:
            return None
        return self.ops.fp8_mm_silu_and_mul(x, segs[0], bias)

    def apply_add_rms_norm(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor,
                           norm_weight: torch.Tensor, eps: float, bias=None):
        """The optional ``QuantMethod`` member: ``fused_add_rms_norm(apply(layer, x, bias),
        residual, norm_weight, eps)`` -> ``(normed, residual)`` in one product where the
        backend's ``QuantOps`` offers it (``ops.fp8_mm_add_rms_norm``; without it this member
        is None) for the layer's weight (one fp8 segment); None where it does not (the caller
        runs ``apply``, then the norm). x is ``[M, K]``."""
        segs = layer.segments
        if len(segs) != 1 or segs[0].kind != "fp8" or x.dim() != 2:
            return None
        return self.ops.fp8_mm_add_rms_norm(x, segs[0], residual, norm_weight, eps, bias)

    def apply_add_rms_norm_fold(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor,
                                norm_weight: torch.Tensor, bias=None):
        """The optional ``QuantMethod`` member (plugin API 24): the producer's half of a
        residual-add RMSNorm split between two products, ``(xg, sumsq, residual)`` as
        ``FusedOps.linear_add_rms_norm_fold`` returns it, through ``ops.
        fp8_mm_add_rms_norm_fold`` (without it this member is None) for one fp8 segment; None
        where the layer's weight is not that (the caller runs ``apply``, then the norm)."""
        segs = layer.segments
        if len(segs) != 1 or segs[0].kind != "fp8" or x.dim() != 2:
            return None
        return self.ops.fp8_mm_add_rms_norm_fold(x, segs[0], residual, norm_weight, bias)

    def apply_rms_scaled(self, layer: nn.Module, x: torch.Tensor, sumsq: torch.Tensor,
                         eps: float, bias=None, silu_and_mul: bool = False):
        """The optional ``QuantMethod`` member (plugin API 24): the consumer's half, ``apply``'s
        product times ``rsqrt(sum(sumsq) / K + eps)`` plus the bias (then ``silu_and_mul`` if
        asked), through ``ops.fp8_mm_rms_scaled`` (without it this member is None) for one fp8
        segment; None where the layer's weight is not that."""
        segs = layer.segments
        if len(segs) != 1 or segs[0].kind != "fp8" or x.dim() != 2:
            return None
        return self.ops.fp8_mm_rms_scaled(x, segs[0], sumsq, eps, bias, silu_and_mul)

    def prequantized_dtype(self, layer: nn.Module, rows: int) -> Optional[torch.dtype]:
        """The optional ``QuantMethod`` member of the fp8 activation fold: the fp8 dtype in which
        ``layer`` takes its input pre-quantized per token at ``rows`` rows (one fp8 segment
        whose ``QuantOps`` runs W8A8 there: ``ops.fp8_w8a8_rows``), else None. None as a
        member where ``QuantOps`` lacks ``fp8_mm_prequantized``."""
        segs = layer.segments
        if len(segs) != 1 or segs[0].kind != "fp8" or not self.ops.fp8_w8a8_rows(rows):
            return None
        return segs[0].qweight.dtype

    def apply_prequantized(self, layer: nn.Module, xa: Fp8Activation, bias=None):
        """``apply`` for an input ``prequantized_dtype`` asked for: ``[M, N]`` in ``xa.dtype``."""
        return self.ops.fp8_mm_prequantized(xa, layer.segments[0], bias)

    def quantize_dense(self, layer: nn.Module, weight: torch.Tensor) -> None:
        """Quantize a dense ``weight [output_size, input_size]`` into ``layer`` (every shard)."""
        for shard in _shards(layer):
            self._quantize_shard(layer, weight[_rows(layer, shard)], shard)

    def init_dummy(self, layer: nn.Module, generator: torch.Generator, scale: float = 0.02) -> None:
        """Random weights (``load_format="dummy"``): uniform dense values, quantized per shard."""
        for shard in _shards(layer):
            rows = _rows(layer, shard)
            w = torch.empty(rows.stop - rows.start, layer.input_size, device=layer.quant_device,
                            dtype=layer.quant_dtype)
            w.uniform_(-scale, scale, generator=generator)
            self._quantize_shard(layer, w, shard)

    # -- for subclasses ---------------------------------------------------------------------

    def _quantize_shard(self, layer, w: torch.Tensor, shard) -> None:
        """Dense rows of one shard -> staged pieces. Default: the scheme takes float weights."""
        self.load_weight(layer, "weight", w, shard)

    def _load(self, layer, name: str, tensor, shard, pieces: dict) -> None:
        raise NotImplementedError

    def _missing(self, pieces: dict) -> list[str]:
        return [] if "weight" in pieces else ["weight"]

    def _finish(self, layer, pieces: dict, rows: slice) -> PackedWeight:
        raise NotImplementedError

    def _merge(self, segments: list[PackedWeight]) -> list[PackedWeight]:
        return cat_segments(segments)

    def _mm(self, x: torch.Tensor, seg: PackedWeight, bias) -> torch.Tensor:
        if seg.kind == "dense":
            return torch.nn.functional.linear(x, seg.weight.to(x.dtype), bias)
        return getattr(self.ops, f"{seg.kind}_mm")(x, seg, bias)


def _shards(layer: nn.Module) -> list:
    return [None] if len(layer.output_sizes) == 1 else list(range(len(layer.output_sizes)))


def _rows(layer: nn.Module, shard: Optional[int]) -> slice:
    """Output rows of ``shard`` in the fused layer (the whole layer for None)."""
    if shard is None:
        return slice(0, layer.output_size)
    start = sum(layer.output_sizes[:shard])
    return slice(start, start + layer.output_sizes[shard])


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"Checkpoint tensor {name} has shape {tuple(src.shape)}, expected "
                         f"{tuple(dst.shape)}; the config does not match the weights.")
    dst.copy_(src)


def dense_segment(tensor: torch.Tensor, layer) -> DenseWeight:
    return DenseWeight(tensor.to(device=layer.quant_device, dtype=layer.quant_dtype).contiguous())
