"""LoRA on the model's linears: adapters stacked in fixed-size slots, one batched op per layer.

Each wrapped layer keeps, per slot ``s`` of ``max_loras``, the adapter's A and B zero-padded to
the slot rank ``R`` (an absent module is all zeros, so it adds nothing)::

    fused qkv (3 slices) under tensor parallelism (this rank's rows of each slice):
      lora_a  [S, 3R, K]          one shrink: buf[T, 3R] = x A_s^T (fp32)
      lora_b  [S, Nq, R] [S, Nk, R] [S, Nv, R]     one expand_slices into y[:, off_i : off_i + N_i]
      scaling [S] fp32            one per slot (a slice whose module scales differently has the
                                  ratio folded into its B when the slot is filled)

Column-parallel layers (qkv, gate_up, fc_in) hold A whole and B's rows of this rank (the same
``shard_ranges`` as the base weight). Row-parallel layers (o, down, fc_out) hold A's columns of
this rank and B whole: each rank adds ``x_r A_r^T B^T`` to its partial product, and the base
layer's sum over ranks (its all-reduce, or the next norm's) sums the LoRA terms too, since
``sum_r (x_r A_r^T) B^T = (x A^T) B^T``.

Which slot each token row uses is the step's ``LoRABatch`` (set by the model runner before a
forward); layers are built with it, nothing global.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.nn as nn

from tessellm.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear

# our layers that are replicated ``Linear``s (not split over tensor-parallel ranks)
REPLICATED = ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")


class LoRABatch:
    """The current step's slot per token row, prepared once for every layer."""

    def __init__(self, ops, num_slots: int):
        self.ops = ops
        self.num_slots = num_slots
        self.meta = None  # ops.prepare's result; None: no row uses an adapter this step
        self.token_slots: Optional[torch.Tensor] = None  # the step's slot per row (MoE experts)

    def set(self, token_slots: Optional[torch.Tensor]) -> None:
        """``token_slots``: int32 [T] on the device (-1: the base model), or None."""
        self.token_slots = token_slots
        self.meta = None if token_slots is None else self.ops.prepare(token_slots, self.num_slots)


def _activation_dtype_and_device(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The model dtype and device of ``base``'s activations: its weight's, or, for a quantized
    layer (packed segments as buffers, no float weight), what its quant method recorded."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype, weight.device
    dtype = getattr(base, "quant_dtype", None) or torch.get_default_dtype()
    tensor = next(itertools.chain(base.parameters(), base.buffers()), None)
    return dtype, tensor.device if tensor is not None else getattr(base, "quant_device", torch.device("cpu"))


class LoRALinear(nn.Module):
    """A column- or row-parallel linear plus ``max_loras`` adapter slots (module docstring)."""

    # ``base`` is the layer as loaded (wrapped after the load): a saved state names its tensors
    # without the ``base.`` (``loader/sharded_state.as_loaded``); the slots are not saved
    wraps_base = True

    def __init__(self, base: nn.Module, batch: LoRABatch, num_slots: int, rank: int):
        super().__init__()
        self.base = base
        self.batch = batch
        self.rank = rank
        self.row_parallel = isinstance(base, RowParallelLinear)
        dtype, device = _activation_dtype_and_device(base)
        n = len(base.output_sizes)
        self.register_buffer("lora_a", torch.zeros(num_slots, n * rank, base.input_size,
                                                   dtype=dtype, device=device), persistent=False)
        self.lora_b = [torch.zeros(num_slots, size, rank, dtype=dtype, device=device)
                       for size in base.output_sizes]
        self.scaling = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.offsets = [sum(base.output_sizes[:i]) for i in range(n)]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)  # output_sizes, reduce_results, ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        meta = self.batch.meta
        if meta is None:
            return self.base(x)
        if not self.row_parallel or self.base.tp.size == 1:
            return self._add_lora(x, self.base(x), meta)
        base = self.base  # tensor-parallel row layer: add before the sum over ranks
        y = base.quant_method.apply(base, x, None) if base.quant_method is not None else base.dense_mm(x, base.weight)
        y = self._add_lora(x, y, meta)
        if not base.reduce_results:
            return y
        y = base.tp.all_reduce(y)
        return y if base.bias is None else y + base.bias

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor, meta) -> torch.Tensor:
        ops, r = self.batch.ops, self.rank
        buf = torch.empty(x.shape[0], self.lora_a.shape[1], dtype=torch.float32, device=x.device)
        ops.shrink(x, self.lora_a, meta, buf)
        expand_slices = getattr(ops, "expand_slices", None)
        if expand_slices is not None:  # all slices in one call (one launch on Triton backends)
            expand_slices(buf, self.lora_b, meta, self.scaling, y, self.offsets)
            return y
        for i, (b, off) in enumerate(zip(self.lora_b, self.offsets)):
            ops.expand(buf[:, i * r:(i + 1) * r], b, meta, self.scaling, y, off)
        return y

    # -- slots -----------------------------------------------------------------------------

    def set_slot(self, slot: int, modules: list) -> None:
        """Fill ``slot`` with one ``ModuleLoRA`` (or None: not adapted) per slice, whole
        (unsharded) tensors: this rank's part is cut here."""
        r = self.rank
        self.lora_a[slot].zero_()
        scale = next((m.scaling for m in modules if m is not None and m.scaling), 0.0)
        self.scaling[slot] = scale
        for i, m in enumerate(modules):
            self.lora_b[i][slot].zero_()
            if m is None:
                continue
            a, b, k = m.a, m.b, m.a.shape[0]
            if scale and m.scaling != scale:  # one scaling per slot: fold the ratio into B
                b = b * (m.scaling / scale)
            if self.row_parallel:
                a = a.narrow(1, self.base.input_start, self.base.input_size)
            else:
                ranges = getattr(self.base, "shard_ranges", None)  # a replicated Linear: whole
                start, rows = ranges[i] if ranges is not None else (0, b.shape[0])
                b = b.narrow(0, start, rows)
            self.lora_a[slot, i * r:i * r + k].copy_(a)
            self.lora_b[i][slot, :, :k].copy_(b)

    def clear_slot(self, slot: int) -> None:
        self.set_slot(slot, [None] * len(self.lora_b))


def wrap_model(model: nn.Module, batch: LoRABatch, num_slots: int, rank: int, names: tuple,
               arch: str = "", optional: tuple = ()) -> dict:
    """Replace each decoder layer's linears named in ``names`` (our layers: ``BaseShapes.layers``,
    the family's) by a ``LoRALinear``. Returns ``{(layer index, our layer name): LoRALinear}``;
    refuses a model without them, naming the layer, the module and the family (``arch``)."""
    wrapped = {}
    arch = arch or type(model).__name__
    layers = getattr(model, "layers", None)
    if layers is None or not hasattr(model, "start_layer"):
        raise ValueError(f"LoRA is not supported for {arch} ({type(model).__name__}): it has no "
                         "decoder layer list to put adapters on.")
    hybrid = hasattr(model, "mamba_layers")  # attention layers and Mamba layers: each its own
    for index in range(model.start_layer, model.end_layer):
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            if hybrid and not hasattr(layers[index], parent_name.partition(".")[0]):
                continue  # a Mamba layer's attention, an attention layer's mamba: none to adapt
            parent = _submodule(layers[index], parent_name)
            base = getattr(parent, attr, None) if parent is not None else None
            if name in optional and not isinstance(base, Linear):
                continue  # this layer has no such MLP (a MoE layer's dense one, or the reverse)
            if name in REPLICATED and type(base) is Linear:
                pass  # a replicated projection (MLA's q_a / kv_a): every rank holds it whole
            elif not isinstance(base, (ColumnParallelLinear, RowParallelLinear)):
                raise ValueError(_no_linear(arch, index, name, parent))
            layer = LoRALinear(base, batch, num_slots, rank)
            setattr(parent, attr, layer)
            wrapped[(index, name)] = layer
    return wrapped


def _submodule(layer: nn.Module, path: str):
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def _no_linear(arch: str, index: int, name: str, parent: nn.Module) -> str:
    from tessellm.layers.moe import FusedMoE

    if parent is None:
        return (f"LoRA is not supported on {arch}'s {name} (layer {index}): the layer has no "
                f"{name.rpartition('.')[0]}; serve the model without --enable-lora.")
    if any(isinstance(m, FusedMoE) for m in parent.modules()):
        return (f"LoRA is not supported on {arch}'s {name} (layer {index}): that MLP is a "
                "mixture of experts, with no dense linear of that name; adapt the attention "
                "(and, for Mixtral, Qwen3-MoE and OLMoE, the experts' own modules).")
    return (f"LoRA is not supported on {arch}'s {name} (layer {index}): it is a "
            f"{type(parent).__name__} without a dense {name.rpartition('.')[2]} linear; serve "
            "the model without --enable-lora.")
