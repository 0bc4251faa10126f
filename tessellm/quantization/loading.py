"""Filling a model whose linear layers are quantized.

Checkpoint tensors that belong to a quantized ``Linear`` go straight to its method's
``load_weight`` (so a layer's ``weight_scale``/``qweight``/``g_idx`` land wherever the scheme
wants them, fused shards included); everything else (embeddings, norms, lm_head) flows on to
the model's own ``load_weights``. Names are routed with the model's ``stacked_params``::

    model.layers.3.self_attn.k_proj.qweight
        -> module layers.3.self_attn.qkv_proj, attr qweight, shard 1

Checkpoint tensors keep their stored dtype here (fp8, int32, fp16 scales); only plain float
weights are cast to the model dtype, as the dense loaders do.

Tensor parallelism: a method sees only this rank's slice of a dense tensor
(``layer.local_slice``), so quantize-on-load schemes (int8, fp8) quantize what the rank holds.
Per-output-row scales are then those of one device for column-parallel layers (whole rows) and
per rank for row-parallel ones (each rank's ``K / T`` columns of a row get their own scale)::

    int8 o_proj W [N, K], T=2:   rank 0: W[:, :K/2] -> q0, s0 = amax(W[:, :K/2]) / 127 per row
                                 rank 1: W[:, K/2:] -> q1, s1 = amax(W[:, K/2:]) / 127 per row
    y = all_reduce(x0 (q0 s0)^T + x1 (q1 s1)^T)       (T=1: one s = max(s0, s1) per row)

Pre-quantized checkpoints (packed int4, fp8 with its scales, GGUF blocks) are split as stored,
never requantized: the method's ``shard_tensor`` (``sharding.py``) cuts the packed codes, zeros
and scales to the rank's rows or whole groups of its columns, so every rank holds exactly its
part of the one-device model's weights.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn

_DTYPE_KEPT = {"weight_scale", "input_scale", "input_scale_ub", "scales", "qweight", "qzeros",
               "g_idx", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "SCB"}
_FLOATS_CAST = ("F64", "F32", "F16", "BF16")  # safetensors dtypes cast to the model dtype


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> every module with a quant method (``Linear``s); names them for error messages."""
    layers = {}
    for name, module in model.named_modules():
        if getattr(module, "quant_method", None) is not None and hasattr(module, "output_sizes"):
            module.quant_name = name
            layers[name] = module
    return layers


def load_quantized_weights(model: nn.Module, weights: Iterable[tuple[str, object]]) -> set[str]:
    """Load ``weights`` into ``model``; returns the parameter names filled (as load_weights).

    A method with ``load_weight`` (this package's) takes each tensor as it comes. Any other
    ``QuantMethod`` (a third-party plugin's) gets a float checkpoint's ``weight`` through
    ``quantize_dense`` once all of a layer's shards have arrived (one layer buffered at a time,
    since checkpoints keep a layer's tensors together); its other tensors are copied by rows.
    """
    layers = quantized_linears(model)
    stacked = getattr(model, "stacked_params", ())
    rename = getattr(model, "checkpoint_names", None)  # a family's own checkpoint names
    # a scheme's own checkpoint form first (bitsandbytes: each weight gathered with its state,
    # ``bnb_stored.stored_weights``), so a family's renames and cuts move it whole
    for scheme_names in {getattr(layer.quant_method, "checkpoint_names", None)
                         for layer in layers.values()} - {None}:
        weights = scheme_names(weights)
    if rename is not None:
        weights = rename(weights)
    routed: set[str] = set()
    pending: dict[str, dict] = {}  # layer name -> shard -> dense rows (foreign methods only)

    def rest() -> Iterator[tuple[str, object]]:
        for name, tensor in weights:
            target = _route(name, layers, stacked)
            if target is None:
                yield name, tensor
                continue
            module_name, attr, shard = target
            layer = layers[module_name]
            routed.add(f"{module_name}.{attr}")
            if hasattr(layer.quant_method, "load_weight"):
                layer.quant_method.load_weight(layer, attr, layer.local_slice(attr, tensor, shard),
                                               shard)
                continue
            if attr == "weight":
                local = layer.local_slice(attr, tensor, shard)
                if _is_dense_float(local):
                    if _buffer_dense(layer, pending.setdefault(module_name, {}), local, shard,
                                     routed):
                        del pending[module_name]
                    continue
            layer.load_shard(attr, tensor, shard)  # slices it itself

    loaded = model.load_weights(rest())
    if pending:
        raise ValueError(f"The checkpoint lacks shards of {sorted(pending)[:3]}; is it complete?")
    return loaded | routed


def _is_dense_float(tensor) -> bool:
    return (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
            and tensor.element_size() >= 2)


def _buffer_dense(layer, buffered: dict, tensor: torch.Tensor, shard, routed: set) -> bool:
    """Keep one shard's dense rows; once the layer is whole, quantize it. True when done."""
    buffered[shard] = tensor
    n = len(layer.output_sizes)
    if n > 1 and len(buffered) < n:
        return False
    order = [None] if n == 1 else list(range(n))
    weight = torch.cat([buffered[s] for s in order]).to(layer.quant_device)
    layer.quant_method.quantize_dense(layer, weight)
    routed.update(f"{layer.quant_name}.{p}" for p, _ in layer.named_parameters(recurse=False)
                  if p != "bias")
    return True


def _route(name: str, layers: dict, stacked) -> Optional[tuple[str, str, Optional[int]]]:
    """The quantized layer ``name`` fills: (module, attr, shard), or None for the model's own
    ``load_weights`` (and for a layer marked ``stored_whole``: its shards come in one stored
    tensor that its owner cuts, ``quantization/stored_parts.py``)."""
    target = _match(name, layers, stacked)
    if target is None or getattr(layers[target[0]], "stored_whole", False):
        return None
    return target


def _match(name: str, layers: dict, stacked) -> Optional[tuple[str, str, Optional[int]]]:
    for candidate in (name, name[len("model."):] if name.startswith("model.") else None):
        if candidate is None:
            continue
        for ckpt_part, our_part, shard in stacked:
            if ckpt_part in candidate:
                module_name, _, attr = candidate.replace(ckpt_part, our_part).rpartition(".")
                if module_name in layers:
                    return module_name, attr, shard
        module_name, _, attr = candidate.rpartition(".")
        if module_name in layers:
            return module_name, attr, None
    return None


def process_quantized(model: nn.Module) -> None:
    for layer in quantized_linears(model).values():
        layer.quant_method.process_weights_after_loading(layer)


@torch.no_grad()
def init_dummy_quantized(model: nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Random weights (``load_format="dummy"``): dense parameters as ``loader.dummy`` fills them,
    quantized layers from random dense values through their method."""
    layers = quantized_linears(model)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    experts = {name: m for name, m in model.named_modules()
               if getattr(m, "quant", None) is not None and hasattr(m, "awaiting_scale")}
    for name, param in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        if owner in experts:
            continue  # fp8 MoE experts and their scales (layers/moe_fp8.py): below
        if owner in layers:
            if attr == "bias":
                param.data.zero_()
        elif "norm" in name:
            param.data.uniform_(0.9, 1.1, generator=gen)
        elif param.is_floating_point():
            param.data.uniform_(-scale, scale, generator=gen)
    if experts:
        from tessellm.layers.moe_fp8 import init_dummy

        for moe in experts.values():
            init_dummy(moe, gen, scale)
    for layer in layers.values():
        method = layer.quant_method
        if hasattr(method, "init_dummy"):
            method.init_dummy(layer, gen, scale)
        else:
            w = torch.empty(layer.output_size, layer.input_size, device=device)
            method.quantize_dense(layer, w.uniform_(-scale, scale, generator=gen))


def iter_prequantized_safetensors(model_dir: str, dtype: torch.dtype) -> Iterator[tuple[str, object]]:
    """Like ``safetensors_loader.iter_safetensors_weights(lazy=True)`` but quantization tensors
    (fp8 weights, int32 packs, scales) keep their stored dtype: lazy handles, so a
    tensor-parallel rank reads only its part of each (``Linear.local_slice``)."""
    from safetensors import safe_open

    from tessellm.loader.safetensors_loader import LazyTensor, safetensors_files

    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                stored = f.get_slice(name).get_dtype()
                keep = name.rpartition(".")[2] in _DTYPE_KEPT or stored not in _FLOATS_CAST
                yield name, LazyTensor(f, name, None if keep else dtype)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (each storage once): the model's weight memory."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def quantized_weight_filter(model: nn.Module):
    """A predicate on checkpoint names: True for the ``.weight`` of a quantized layer (the GGUF
    loader keeps exactly those in their blocks)."""
    layers = quantized_linears(model)
    stacked = getattr(model, "stacked_params", ())
    return lambda name: name.endswith(".weight") and _route(name, layers, stacked) is not None
