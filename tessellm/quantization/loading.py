"""Filling a model whose linear layers are quantized.

Checkpoint tensors that belong to a quantized ``Linear`` go straight to its method's
``load_weight`` (so a layer's ``weight_scale``/``qweight``/``g_idx`` land wherever the scheme
wants them, fused shards included); everything else (embeddings, norms, lm_head) flows on to
the model's own ``load_weights``. Names are routed with the model's ``stacked_params``::

    model.layers.3.self_attn.k_proj.qweight
        -> module layers.3.self_attn.qkv_proj, attr qweight, shard 1

Checkpoint tensors keep their stored dtype here (fp8, int32, fp16 scales); only plain float
weights are cast to the model dtype, as the dense loaders do.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn

_DTYPE_KEPT = {"weight_scale", "input_scale", "input_scale_ub", "scales", "qweight", "qzeros",
               "g_idx"}


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> every module with a quant method (``Linear``s); names them for error messages."""
    layers = {}
    for name, module in model.named_modules():
        if getattr(module, "quant_method", None) is not None and hasattr(module, "output_sizes"):
            module.quant_name = name
            layers[name] = module
    return layers


def load_quantized_weights(model: nn.Module, weights: Iterable[tuple[str, object]]) -> set[str]:
    """Load ``weights`` into ``model``; returns the parameter names filled (as load_weights)."""
    layers = quantized_linears(model)
    stacked = getattr(model, "stacked_params", ())
    routed: set[str] = set()

    def rest() -> Iterator[tuple[str, object]]:
        for name, tensor in weights:
            target = _route(name, layers, stacked)
            if target is None:
                yield name, tensor
                continue
            module_name, attr, shard = target
            layers[module_name].quant_method.load_weight(layers[module_name], attr, tensor, shard)
            routed.add(f"{module_name}.{attr}")

    loaded = model.load_weights(rest())
    return loaded | routed


def _route(name: str, layers: dict, stacked) -> Optional[tuple[str, str, Optional[int]]]:
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
    quantized layers through their method (random values, quantized)."""
    layers = quantized_linears(model)
    device = next(iter(layers.values())).quant_device if layers else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith(".bias") and name[: -len(".bias")] in layers:
            param.data.zero_()
        elif "norm" in name:
            param.data.uniform_(0.9, 1.1, generator=gen)
        elif param.is_floating_point():
            param.data.uniform_(-scale, scale, generator=gen)
    for layer in layers.values():
        layer.quant_method.init_dummy(layer, gen, scale)


def iter_prequantized_safetensors(model_dir: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Like ``safetensors_loader.iter_safetensors_weights`` but quantization tensors (fp8
    weights, int32 packs, scales) keep their stored dtype."""
    from safetensors import safe_open

    from tessellm.loader.safetensors_loader import safetensors_files

    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                keep = (name.rpartition(".")[2] in _DTYPE_KEPT or not tensor.is_floating_point()
                        or tensor.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz,
                                            torch.float8_e5m2))
                yield name, tensor if keep else tensor.to(dtype)


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


def gguf_source(path: str) -> bool:
    return path.endswith(".gguf") and os.path.isfile(path)
