"""Quantized linear layers in a sharded state (``loader/sharded_state.py``): their packed
segments saved as they sit in memory and rebuilt from the files at load, never quantized again.

A quantized ``Linear`` holds its weight only as ``layer.segments`` (``quantization/packed.py``),
built at load with attributes a state dict does not hold (the int8 group size); a rank's files
carry them as JSON in the safetensors metadata (``QUANTIZED_KEY``: layer name -> one
``{"kind", ...}`` per segment), and the segments' buffers as tensors named
``<layer>.segments.<i>.<buffer>``.

Supported: ``quantization="int8"`` and ``"fp8"`` (per-channel: on load from a dense checkpoint
or an fp8 checkpoint with its scales) on dense layers. Refused by name: other schemes (AWQ /
GPTQ int4, block fp8, GGUF, MXFP4, whose segments a backend may re-lay at load) and quantized
models with routed experts (their experts keep other structures).
"""

from __future__ import annotations

import json
from typing import Callable, Optional

import torch
import torch.nn as nn

QUANTIZED_KEY = "quantized_segments"
SCHEMES = ("int8", "fp8")


def check_supported(model: nn.Module, scheme: Optional[str], what: str) -> None:
    """Refuse (before any file is written or read) what a sharded state cannot hold."""
    if scheme is None:
        return
    if scheme not in SCHEMES:
        raise ValueError(f"Sharded state cannot {what} a {scheme}-quantized model yet (supported: "
                         f"unquantized, {', '.join(SCHEMES)}); load the quantized checkpoint with "
                         "load_format='auto'.")
    if any(isinstance(getattr(m, "w13", None), torch.Tensor) for m in model.modules()):
        raise ValueError(f"Sharded state cannot {what} a quantized model with routed experts "
                         "yet; load the checkpoint with load_format='auto'.")


def describe(model: nn.Module) -> str:
    """The JSON of every quantized linear layer's segments (kind and attributes)."""
    from tessellm.quantization.loading import quantized_linears
    from tessellm.quantization.packed import DenseWeight, Fp8Weight, Int8Weight

    from tessellm.loader.sharded_state import as_loaded

    layers, rename = {}, as_loaded(model)
    for name, layer in quantized_linears(model).items():
        name = rename(name)  # a LoRA wrapper and its base are one layer as loaded
        segs = []
        for seg in layer.segments:
            if type(seg) is Int8Weight:
                segs.append({"kind": "int8", "group_size": seg.group_size})
            elif type(seg) in (Fp8Weight, DenseWeight):
                segs.append({"kind": seg.kind})
            else:
                raise ValueError(f"Sharded state cannot save {name}'s {type(seg).__name__} "
                                 "segment yet; load the quantized checkpoint with load_format='auto'.")
        layers[name] = segs
    return json.dumps(layers, sort_keys=True)


def rebuild(model: nn.Module, description: Optional[str], tensor: Callable[[str], torch.Tensor],
            source: str) -> None:
    """Every quantized linear layer's segments from its saved ``description`` and the files'
    ``tensor(name)``, on the layer's device; the staging of a checkpoint load dropped."""
    from tessellm.quantization.loading import quantized_linears
    from tessellm.quantization.packed import DenseWeight, Fp8Weight, Int8Weight

    saved = json.loads(description) if description else {}
    layers = quantized_linears(model)
    if set(saved) != set(layers):
        odd = sorted(set(saved) ^ set(layers))
        raise ValueError(f"load_format='sharded_state': {source} describes quantized layers "
                         f"{sorted(saved)[:3]}..., this model has {sorted(layers)[:3]}... (they "
                         f"differ in {odd[:3]}); load it with the quantization it was saved with.")
    for name, layer in layers.items():
        segs = []
        for i, seg in enumerate(saved[name]):
            prefix = f"{name}.segments.{i}."
            if seg["kind"] == "int8":
                made = Int8Weight(tensor(prefix + "qweight"), tensor(prefix + "scales"), seg["group_size"])
            elif seg["kind"] == "fp8":
                made = Fp8Weight(tensor(prefix + "qweight"), tensor(prefix + "scales"))
            else:
                made = DenseWeight(tensor(prefix + "weight"))
            segs.append(made.to(layer.quant_device))
        layer.segments = nn.ModuleList(segs)
        layer.quant_staged = {}
