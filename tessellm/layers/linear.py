"""Linear layers, including the fused QKV and gate-up projections and their weight loading."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm import envs
from tessellm.distributed.parallel_state import TensorParallel
from tessellm.quantization import sharding
from tessellm.quantization.packed import Fp8Activation
from tessellm.quantization.sharding import TPSplit, materialize


class Linear(nn.Module):
    """``y = x W^T + b``. A fused layer stacks several logical weights along the output dim.

    ``shard_sizes`` names the output rows of each logical weight, so a checkpoint's separate
    ``q_proj``/``k_proj``/``v_proj`` load into one ``qkv_proj``::

        weight rows: [ q (shard 0) | k (shard 1) | v (shard 2) ]
    """

    # The dense product ``(x, weight, bias) -> y``: the backend's ``FusedOps.linear`` when it has
    # one (``use_backend_linear``), else torch's.
    dense_mm = staticmethod(F.linear)
    # ``(x, weight, bias) -> silu_and_mul(x W^T + b)`` for a [gate; up] layer in one product:
    # the backend's optional ``FusedOps.linear_silu_and_mul`` (``use_backend_linear``), or None.
    dense_silu_mm = None

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False,
                 quant_method=None):
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.quant_method = quant_method
        if quant_method is not None:
            quant_method.create_weights(self, input_size, self.output_size, None)
        else:
            self.weight = nn.Parameter(torch.empty(self.output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.apply_quant(x, self.bias)
        return self.dense_mm(x, self.weight, self.bias)

    def apply_quant(self, x, bias) -> torch.Tensor:
        """The quant method's product; ``x`` may be an ``Fp8Activation`` (``fp8_input_dtype``
        asked its producer for one)."""
        if isinstance(x, Fp8Activation):
            return self.quant_method.apply_prequantized(self, x, bias)
        return self.quant_method.apply(self, x, bias)

    def tp_split(self, shard: Optional[int]) -> Optional[TPSplit]:
        """The part of logical weight ``shard`` this rank holds; None: all of it (here, and in
        the tensor-parallel layers below at tensor_parallel_size 1)."""
        return None

    def local_slice(self, name: str, tensor, shard: Optional[int]):
        """The part of a checkpoint tensor (``name``: "weight", "bias", or a quantized piece
        such as "qweight" or "weight_scale" of logical shard ``shard``) this layer holds, read
        from the file if it is lazy. The whole tensor here; the tensor-parallel layers below
        narrow it to their rank's rows or columns (``tp_split``): a quant method with
        ``shard_tensor`` (tessellm.quantization's) cuts its own layouts, a dense tensor is cut
        by rows or columns. Quantized loading (``quantization.loading``) calls it too, before
        a method quantizes or unpacks the slice."""
        split = self.tp_split(shard)
        if split is None:
            return materialize(tensor)
        shard_tensor = getattr(self.quant_method, "shard_tensor", None)
        if shard_tensor is not None:
            return shard_tensor(self, name, tensor, split)
        _check_dense(self, name)
        return sharding.dense(self, name, tensor, split)

    def load_shard(self, name: str, tensor, shard: Optional[int]) -> None:
        """Copy a checkpoint tensor (``name`` is "weight" or "bias") into its rows. A quant
        method with ``load_weight`` (tessellm.quantization's) takes the tensor instead: it knows
        where quantized pieces (``qweight``, ``weight_scale``, ...) of a shard go."""
        tensor = self.local_slice(name, tensor, shard)
        load_weight = getattr(self.quant_method, "load_weight", None)
        if load_weight is not None:
            load_weight(self, name, tensor, shard)
            return
        param = getattr(self, name)
        if shard is None:
            _copy_checked(param.data, tensor, name)
            return
        start = sum(self.output_sizes[:shard])
        _copy_checked(param.data[start:start + self.output_sizes[shard]], tensor, name)


class ColumnParallelLinear(Linear):
    """Output rows split over the tensor-parallel group. Each logical shard is split on its own,
    so a fused layer keeps its layout on every rank::

        full qkv rows:  [ q0 q1 | k0 k1 | v0 v1 ]        (T=2)
        rank 0 holds:   [ q0 | k0 | v0 ]    rank 1: [ q1 | k1 | v1 ]

    ``shard_ranges`` overrides the even split: per logical shard, ``(first row, rows)`` of the
    checkpoint tensor this rank holds (the attention layer passes it to replicate KV heads when
    there are fewer of them than ranks). The output stays split: the next layer is row-parallel.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False,
                 quant_method=None, tp: Optional[TensorParallel] = None,
                 shard_ranges: Optional[Sequence[tuple[int, int]]] = None):
        self.tp = tp or TensorParallel()
        if shard_ranges is None:
            shard_ranges = []
            for size in output_sizes:
                if size % self.tp.size:
                    raise ValueError(f"An output size of {size} does not split over "
                                     f"tensor_parallel_size {self.tp.size}; use a size that divides it.")
                rows = size // self.tp.size
                shard_ranges.append((self.tp.rank * rows, rows))
        self.shard_ranges = list(shard_ranges)
        super().__init__(input_size, [rows for _, rows in self.shard_ranges], bias, quant_method)

    def tp_split(self, shard: Optional[int]) -> Optional[TPSplit]:
        if self.tp.size == 1:
            return None
        start, rows = self.shard_ranges[shard or 0]
        return TPSplit(0, start, rows, self.tp.size)


class RowParallelLinear(Linear):
    """Input columns split over the group; partial products summed with an all-reduce::

        x = [x0 | x1] (split by the column-parallel layer before)   W = [W0 | W1]
        y = all_reduce(x_r W_r^T) + b     (the bias is added once, after the sum)

    A scheme quantizing on load sees only ``W_r``, so its per-row scales are this rank's
    (``quantization/loading.py`` draws it).

    ``reduce_results=False`` returns the partial product ``x_r W_r^T`` unsummed: whoever takes
    the output sums it (the model's next RMSNorm, ``layers/norm.py``, which can fuse the
    all-reduce with the residual add and the norm). It needs ``bias=False``.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False, quant_method=None,
                 tp: Optional[TensorParallel] = None, reduce_results: bool = True):
        self.tp = tp or TensorParallel()
        if input_size % self.tp.size:
            raise ValueError(f"An input size of {input_size} does not split over "
                             f"tensor_parallel_size {self.tp.size}; use a size that divides it.")
        if bias and not reduce_results:
            raise ValueError("RowParallelLinear(reduce_results=False) takes no bias: it is added "
                             "once, after the sum, which this layer then does not do.")
        local = input_size // self.tp.size
        super().__init__(local, [output_size], bias, quant_method)
        self.input_start = self.tp.rank * local
        self.reduce_results = reduce_results

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        if self.quant_method is not None:
            y = self.apply_quant(x, None)
        else:
            y = self.dense_mm(x, self.weight)
        if not self.reduce_results:
            return y
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def tp_split(self, shard: Optional[int]) -> Optional[TPSplit]:
        return None if self.tp.size == 1 else TPSplit(1, self.input_start, self.input_size,
                                                      self.tp.size)


def use_backend_linear(model: nn.Module, ops) -> int:
    """Route the model's dense (unquantized) linears and LM head through ``ops.linear`` when the
    backend's ``FusedOps`` provides it (an optional member), and give them
    ``ops.linear_silu_and_mul`` (optional too; ``fused_silu_and_mul`` uses it; unless
    ``TESSELLM_SILU_FOLD=0``, ``tessellm.envs.silu_fold``). Returns how many
    modules took ``ops.linear``."""
    linear = getattr(ops, "linear", None)
    silu_mm = getattr(ops, "linear_silu_and_mul", None) if envs.silu_fold() else None
    count = 0
    for module in model.modules():
        if getattr(module, "quant_method", None) is None and hasattr(module, "dense_mm"):
            if linear is not None:
                module.dense_mm = linear
                count += 1
            if silu_mm is not None and hasattr(module, "dense_silu_mm"):
                module.dense_silu_mm = silu_mm
    return count


def fused_silu_and_mul(layer: nn.Module, x: torch.Tensor, max_rows: int) -> Optional[torch.Tensor]:
    """``silu_and_mul(layer(x))`` as one product (at decode: the GEMV with the activation in
    its epilogue, one launch instead of two) where the backend offers it for this layer and x
    has at most ``max_rows`` rows, else None: the caller runs the layer, then the activation.
    Only for a plain ``Linear`` stacking two equal shards [gate; up]: not a LoRA wrapper (its
    adapters add to gate and up before the activation), whose type is not a ``Linear``. x is
    ``[M, K]``. The rows are looked at only where the op is offered: a branch on them is a
    shape guard under ``torch.compile`` (the cpu backend's decode graph serves any batch).
    On unless ``TESSELLM_SILU_FOLD=0`` (``tessellm.envs.silu_fold``)."""
    if (not isinstance(layer, Linear) or len(layer.output_sizes) != 2
            or layer.output_sizes[0] != layer.output_sizes[1] or isinstance(x, Fp8Activation)):
        return None
    if layer.quant_method is None:
        mm = layer.dense_silu_mm
        if mm is None or x.shape[0] > max_rows:
            return None
        return mm(x, layer.weight, layer.bias)
    apply = getattr(layer.quant_method, "apply_silu_and_mul", None)
    if apply is None or x.shape[0] > max_rows or not envs.silu_fold():
        return None
    return apply(layer, x, layer.bias)


def fused_linear_add_rms_norm(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor,
                              norm: nn.Module, consumer: Optional[nn.Module] = None):
    """``norm(layer(x), residual)`` as one product (at one row: the GEMV with the residual-add
    RMSNorm in its last program, one launch instead of two) where the backend offers it, else
    None: the caller runs the layer, then the norm. Only for a plain ``Linear`` whose output is
    whole on this rank (no tensor-parallel sum, not a LoRA wrapper) into an ``RMSNorm``
    without a reduce group whose output ``consumer`` takes unquantized, and one row of x
    (decode at batch 1; the rows are looked at only where the op is offered). Returns
    ``(normed, residual)``. Asked only under ``TESSELLM_GEMV_NORM_EPILOGUE=1``
    (``tessellm.envs.gemv_norm_epilogue``; the decoder layer checks it once)."""
    if (not isinstance(layer, Linear) or isinstance(x, Fp8Activation)
            or getattr(norm, "reduce", None) is not None or residual is None):
        return None
    tp = getattr(layer, "tp", None)
    if tp is not None and tp.size > 1:
        return None
    ops = getattr(norm, "ops", None)
    weight, eps = getattr(norm, "weight", None), getattr(norm, "eps", None)
    if ops is None or weight is None or eps is None:
        return None
    if layer.quant_method is None:
        mm = getattr(ops, "linear_add_rms_norm", None)
        if mm is None or x.dim() != 2 or x.shape[0] != 1 or fp8_input_dtype(consumer, 1):
            return None
        return mm(x, layer.weight, residual, weight, eps, layer.bias)
    apply = getattr(layer.quant_method, "apply_add_rms_norm", None)
    if apply is None or x.dim() != 2 or x.shape[0] != 1 or fp8_input_dtype(consumer, 1):
        return None
    return apply(layer, x, residual, weight, eps, layer.bias)


class NormFold(NamedTuple):
    """A residual-add RMSNorm whose first half the product before it ran
    (``fold_norm_out``; ``TESSELLM_NORM_FOLD2``): ``x`` is ``round(h * norm.weight)`` (``h``
    the new residual), ``sumsq`` float32 partial sums whose total is ``sum(h^2)``, ``norm``
    the ``RMSNorm`` module (its ``eps`` and ``ops``). The product after it takes it with
    ``fold_norm_in``, which scales its sums by ``rsqrt(sum(sumsq) / K + eps)``."""

    x: torch.Tensor
    sumsq: torch.Tensor
    norm: nn.Module


def _plain_whole(layer: Optional[nn.Module]) -> bool:
    """A plain ``Linear`` (not a LoRA wrapper) whose output is whole on this rank."""
    tp = getattr(layer, "tp", None)
    return isinstance(layer, Linear) and (tp is None or tp.size == 1)


def fold_norm_takes(layer: Optional[nn.Module], ops) -> bool:
    """Whether ``layer`` can take a ``NormFold`` in its product (``fold_norm_in`` without the
    unfused fallback): a plain whole ``Linear`` whose backend offers the consumer's half
    (``FusedOps.linear_rms_scaled`` for a dense weight, ``QuantMethod.apply_rms_scaled``
    for a quantized one)."""
    if not _plain_whole(layer):
        return False
    if layer.quant_method is None:
        return getattr(ops, "linear_rms_scaled", None) is not None
    return getattr(layer.quant_method, "apply_rms_scaled", None) is not None


def fold_norm_out(layer: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor],
                  norm: nn.Module, consumer: Optional[nn.Module]):
    """The product of ``layer`` and the first half of ``norm(product, residual)`` in one call
    where the backend offers it (at one row: the GEMV's epilogue stores the new residual,
    ``round(h * norm.weight)`` and partial sums of squares), else None: the caller runs the
    layer, then the norm. ``consumer`` is the layer that takes the norm's output; it must take
    a ``NormFold`` (``fold_norm_takes``) and not want it quantized. Only for a plain whole
    ``Linear`` into an ``RMSNorm`` without a reduce group, and one row of x (batch-1 decode;
    the rows are looked at only where the op is offered). Returns ``(NormFold, residual)``.
    Asked only on the fold path (``models.decoder.norm_fold2_on``, ``TESSELLM_NORM_FOLD2``)."""
    if (not _plain_whole(layer) or isinstance(x, Fp8Activation) or residual is None
            or getattr(norm, "reduce", None) is not None):
        return None
    ops = getattr(norm, "ops", None)
    weight = getattr(norm, "weight", None)
    if ops is None or weight is None or getattr(norm, "eps", None) is None \
            or not fold_norm_takes(consumer, ops):
        return None
    if layer.quant_method is None:
        mm = getattr(ops, "linear_add_rms_norm_fold", None)
    else:
        mm = getattr(layer.quant_method, "apply_add_rms_norm_fold", None)
    if mm is None or x.dim() != 2 or x.shape[0] != 1 or fp8_input_dtype(consumer, 1):
        return None
    if layer.quant_method is None:
        got = mm(x, layer.weight, residual, weight, layer.bias)
    else:
        got = mm(layer, x, residual, weight, layer.bias)
        if got is None:
            return None
    xg, sumsq, residual = got
    return NormFold(xg, sumsq, norm), residual


def fold_norm_in(layer: nn.Module, fold: NormFold, silu_and_mul: bool = False) -> torch.Tensor:
    """``layer``'s product of the RMS-normed row a ``NormFold`` stands for (``silu_and_mul`` of
    it for a stacked ``[gate; up]`` layer if asked): the backend's consumer half where
    ``fold_norm_takes``, else the norm finished in torch (``x * rstd``, the norm weight in x
    already) and the layer as usual."""
    norm = fold.norm
    if fold_norm_takes(layer, norm.ops):
        if layer.quant_method is None:
            y = norm.ops.linear_rms_scaled(fold.x, layer.weight, fold.sumsq, norm.eps,
                                           layer.bias, silu_and_mul)
        else:
            y = layer.quant_method.apply_rms_scaled(layer, fold.x, fold.sumsq, norm.eps,
                                                    layer.bias, silu_and_mul)
        if y is not None:
            return y
    x = fold.x
    rstd = torch.rsqrt(fold.sumsq.float().sum() / x.shape[-1] + norm.eps)
    y = layer((x.float() * rstd).to(x.dtype))
    return norm.ops.silu_and_mul(y) if silu_and_mul else y


def fp8_input_dtype(layer: Optional[nn.Module], rows: int) -> Optional[torch.dtype]:
    """The fp8 activation fold's one decision: the fp8 dtype in which ``layer`` takes its
    input pre-quantized per token (an ``Fp8Activation`` from the op producing it: RMSNorm or
    SiLU-and-mul, ``layers/norm.py``, ``models/decoder.py``) at ``rows`` rows, else None (it
    takes the model-dtype tensor). Yes only for a plain ``Linear`` (not a LoRA wrapper: its
    adapters read x in the model dtype) whose quant method holds one fp8 segment that its
    ``QuantOps`` multiplies as W8A8 at this M (``QuantMethod.prequantized_dtype``). M is fixed
    per captured graph, so a graph takes one side. Callers ask only while the fold is on
    (``tessellm.envs.fp8_act_fold``: unless ``TESSELLM_FP8_ACT_FOLD=0``) and where their backend's
    ``FusedOps`` offers the producing op, so the rows are never looked at otherwise."""
    if not isinstance(layer, Linear) or layer.quant_method is None:
        return None
    dtype_for = getattr(layer.quant_method, "prequantized_dtype", None)
    return None if dtype_for is None else dtype_for(layer, rows)


def _check_dense(layer: Linear, name: str) -> None:
    """A quant method without ``shard_tensor`` (a third-party plugin's) gets dense slices only."""
    if name not in ("weight", "bias"):
        raise NotImplementedError(
            f"The checkpoint tensor {name!r} of {type(layer.quant_method).__name__} layers "
            "cannot be split over tensor-parallel ranks: the method has no shard_tensor; run it "
            "with tensor_parallel_size=1.")


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"Checkpoint tensor for {name} has shape {tuple(src.shape)}, "
                         f"expected {tuple(dst.shape)}; the config does not match the weights.")
    dst.copy_(src)
