"""Read a PEFT LoRA adapter directory and check it against the base model, on the host.

``adapter_config.json`` + ``adapter_model.safetensors`` (or ``adapter_model.bin``, read with
``torch.load(weights_only=True)``: tensors only, never arbitrary pickled objects). Every
refusal is one ``ValueError`` sentence naming the adapter, the problem and the fix: DoRA,
trained bias or extra saved modules, a module the family's LoRA does not cover (naming the
ones it does, ``families.py``), a rank above ``max_lora_rank``, shapes that do not match the
base model, unreadable files.

The adapter's tensors are keyed by HF module names, which are the family's (``families.py``:
``model.layers.3.self_attn.q_proj``, ``gpt_neox.layers.3.attention.query_key_value``,
``transformer.h.3.mlp.c_fc``). A fused module (Phi-3's ``qkv_proj``, GPT-NeoX's per-head
``query_key_value``) is split here into one logical module per part: the same A, and B's rows
of that part, cut as the family's loader cuts the weight (``y_part = s * x A^T B_part^T``).

Scaling per module (PEFT's): ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` override r / alpha per module.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from tessellm.lora.experts import match as expert_match
from tessellm.lora.experts import stack_layer
from tessellm.lora.request import LoRARequest
from tessellm.lora.shapes import BaseShapes


# ``<module name>.lora_A[.adapter].weight`` -> the module name
_MODULE_NAME = re.compile(r"\.lora_[AB](?:\.[\w-]+)?\.weight$")

# PEFT module names of input embeddings and output heads (refused by name from the config).
_EMBEDDINGS = frozenset({"embed_tokens", "lm_head", "wte", "wpe", "embed_out", "word_embeddings"})


@dataclass
class ModuleLoRA:
    """One adapted linear: ``y += scaling * (x A^T) B^T``; float32 host tensors."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scaling: float


@dataclass
class LoRAAdapter:
    request: LoRARequest
    rank: int  # the largest rank over its modules
    modules: dict = field(default_factory=dict)  # (layer index, logical module) -> ModuleLoRA

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes if hasattr(m, "nbytes") else m.a.numel() * 4 + m.b.numel() * 4
                   for m in self.modules.values())


def load_adapter(lora: LoRARequest, base: BaseShapes, max_rank: int) -> LoRAAdapter:
    """Parse and check ``lora.lora_path``; raises ValueError naming the problem."""
    where = f"LoRA adapter {lora.lora_name!r} ({lora.lora_path})"
    config = _read_config(lora.lora_path, where)
    _check_config(config, where)
    tensors = _read_tensors(lora.lora_path, where)
    pairs, experts = _pairs(tensors, base, where)
    adapter = LoRAAdapter(lora, 0)
    for layer, found in sorted(experts.items()):
        stacked = stack_layer(found, config, base.expert_shapes, base.num_experts, max_rank,
                              where, lambda a, b, fan_in, fan_out, name: _check_pair(
                                  a, b, fan_in, fan_out, name, max_rank, where, "expert " + name))
        adapter.rank = max(adapter.rank, stacked.rank)
        adapter.modules[(layer, "experts")] = stacked
    for (layer, module), ab in sorted(pairs.items()):
        whole = _module(ab, module, config, base, max_rank, where)
        adapter.rank = max(adapter.rank, whole.a.shape[0])
        for part, b in zip(base.modules[module], base.split(module, whole.b)):
            adapter.modules[(layer, part)] = ModuleLoRA(whole.a, b.contiguous(), whole.scaling)
    return adapter


def _key_pattern(base: BaseShapes) -> re.Pattern:
    """A PEFT tensor key of a decoder layer's module: ``base_model.model.`` then the family's
    layer list (its first part optional: a bare ``...Model`` has none), the layer, the module
    path under it (group 2), ``lora_A|B`` (group 3), an optional adapter name."""
    head, _, rest = base.layer_prefix.rpartition(".")
    layers = rf"(?:{re.escape(head)}\.)?{re.escape(rest)}" if head else re.escape(rest)
    return re.compile(rf"^(?:base_model\.model\.)?{layers}\.(\d+)\.([\w.]+?)"
                      r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def _pairs(tensors: dict, base: BaseShapes, where: str) -> dict:
    """``{(layer, HF module path under it): {"A": tensor, "B": tensor, "name": the module's
    name in the adapter}}`` and, for a family whose experts take LoRA, ``{layer: [(expert,
    part, A, B, name)]}`` (``experts.py``); refuses a tensor of a module the family's LoRA does
    not cover, naming what it does."""
    from tessellm.multimodal.text_only import image_text_architecture, lora_key

    pattern = _key_pattern(base)
    rename = base.family.rename
    text_only = image_text_architecture(base.config) is not None  # images off: the LM's paths
    pairs: dict = {}
    expert_pairs: dict = {}  # (layer, path) -> {"A", "B", "name", "hit"}
    for key, tensor in tensors.items():
        ours = lora_key(key) if text_only or base.image_text else key
        if ours is None and base.image_text:  # images on: the tower runs without the adapter
            raise ValueError(f"{where} has tensor {key!r} of the vision tower or projector; "
                             f"LoRA on {base.arch} adapts its language model only. Retrain "
                             "with target_modules limited to the language model, or serve "
                             "text-only (--limit-mm-per-prompt '{\"image\": 0}').")
        if ours is None:  # the vision tower's: not built with images off
            continue
        if rename is not None:  # the family's other naming (EXAONE's remote code) -> ours
            ours = rename(ours.removeprefix("base_model.model."))
        m = pattern.match(ours)
        if m is None:
            raise ValueError(f"{where} has tensor {key!r}, which is not a LoRA A/B matrix of a "
                             f"decoder layer's projection; LoRA on {base.arch} supports "
                             f"{base.supported()}.")
        layer, path, ab = int(m.group(1)), m.group(2), m.group(3)
        hit = expert_match(base.family.experts, path) if base.family.experts else None
        if hit is not None and layer < base.num_layers:
            pair = expert_pairs.setdefault((layer, path), {"hit": hit})
            pair[ab] = tensor
            pair["name"] = _MODULE_NAME.sub("", key.removeprefix("base_model.model."))
            continue
        if path not in base.modules:
            raise ValueError(f"{where} adapts {path} (layer {layer}), which {base.arch} has no "
                             f"LoRA support for; it supports {base.supported()}; retrain the "
                             "adapter on those modules.")
        if layer >= base.num_layers:
            raise ValueError(f"{where} adapts layer {layer}, but the base model has "
                             f"{base.num_layers} layers; it was trained for another model.")
        pair = pairs.setdefault((layer, path), {})
        pair[ab] = tensor
        pair["name"] = _MODULE_NAME.sub("", key.removeprefix("base_model.model."))
    if not pairs and not expert_pairs:
        raise ValueError(f"{where} holds no LoRA weights.")
    experts: dict = {}
    for (layer, path), pair in sorted(expert_pairs.items()):
        if "A" not in pair or "B" not in pair:
            raise ValueError(f"{where} has lora_{'A' if 'A' in pair else 'B'} but not both A and "
                             f"B for {pair['name']}.")
        experts.setdefault(layer, []).append((*pair["hit"], pair["A"], pair["B"], pair["name"]))
    return pairs, experts


def _read_config(path: str, where: str) -> dict:
    if not os.path.isdir(path):
        raise ValueError(f"{where}: the directory does not exist.")
    cfg = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg):
        raise ValueError(f"{where} has no adapter_config.json; give a PEFT adapter directory.")
    try:
        with open(cfg) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: adapter_config.json is not readable JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where}: adapter_config.json is not a JSON object.")
    return config


def _check_config(config: dict, where: str) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{where} is a {peft_type} adapter; only LoRA adapters are supported.")
    if config.get("use_dora"):
        raise ValueError(f"{where} uses DoRA (use_dora), which is not supported; serve a plain "
                         "LoRA adapter or merge the DoRA weights into the model.")
    if config.get("modules_to_save"):
        raise ValueError(f"{where} saves whole modules ({config['modules_to_save']}), which is "
                         "not supported; only LoRA on the model's projections is.")
    targets = config.get("target_modules")
    outside = sorted(set(targets) & _EMBEDDINGS) if isinstance(targets, list) else []
    if outside or config.get("trainable_token_indices"):
        what = f"target_modules {outside}" if outside else "trainable_token_indices"
        raise ValueError(f"{where} adapts the embeddings or the LM head ({what}), which is not "
                         "supported: LoRA covers the decoder layers' projections only; retrain "
                         "the adapter without them.")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where} trains biases (bias={config['bias']!r}), which is not "
                         "supported; retrain it with bias='none'.")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{where} sets fan_in_fan_out, which the supported families' linears "
                         "never use; it was trained for another architecture.")


def _read_tensors(path: str, where: str) -> dict:
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(st, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{where}: adapter_model.safetensors is corrupt or unreadable "
                             f"({exc}); re-save the adapter.") from None
    pt = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(pt):
        try:  # weights_only: plain tensors, never arbitrary pickled code
            tensors = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ValueError(f"{where}: adapter_model.bin is corrupt or holds more than tensors "
                             f"({type(exc).__name__}); re-save it as safetensors.") from None
        if not isinstance(tensors, dict):
            raise ValueError(f"{where}: adapter_model.bin is not a dict of tensors.")
        return tensors
    raise ValueError(f"{where} has no adapter_model.safetensors (nor adapter_model.bin).")


def _module(ab: dict, module: str, config: dict, base: BaseShapes, max_rank: int,
            where: str) -> ModuleLoRA:
    name = ab.pop("name")  # as the adapter names it (alpha_pattern matches that)
    if set(ab) != {"A", "B"}:
        raise ValueError(f"{where} has lora_{''.join(ab)} but not both A and B for {name}.")
    a, b = ab["A"].float(), ab["B"].float()
    rank = a.shape[0]
    fan_in, fan_out = base.peft_shape(module)
    _check_pair(a, b, fan_in, fan_out, name, max_rank, where, module)
    alpha = float(_pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", 8)))
    if config.get("use_rslora"):
        scaling = alpha / math.sqrt(rank)
    else:
        scaling = alpha / rank
    if not math.isfinite(scaling) or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError(f"{where}: {name} has non-finite weights or scaling; the file is corrupt.")
    return ModuleLoRA(a.contiguous(), b.contiguous(), scaling)


def _check_pair(a, b, fan_in: int, fan_out: int, name: str, max_rank: int, where: str,
                module: str) -> None:
    """One module's A and B chain, fit the base module's (in, out) and the rank."""
    rank = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
        raise ValueError(f"{where}: {name} has lora_A {tuple(a.shape)} and lora_B "
                         f"{tuple(b.shape)}, which do not chain; the file is corrupt.")
    if rank > max_rank:
        raise ValueError(f"{where} has rank {rank} at {name}, above max_lora_rank {max_rank}; "
                         f"start the engine with --max-lora-rank {_next_pow2(rank)} or more.")
    if a.shape[1] != fan_in or b.shape[0] != fan_out:
        raise ValueError(f"{where}: {name} maps {a.shape[1]} -> {b.shape[0]} features but the "
                         f"base model's {module} maps {fan_in} -> {fan_out}; the adapter was "
                         "trained for another base model.")


def _pattern(patterns, name: str, default):
    """PEFT's per-module override: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
