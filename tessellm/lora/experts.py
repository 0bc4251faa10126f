"""LoRA on a MoE layer's experts: the two ways PEFT names them, read into one stacked module.

PEFT adapters for MoE models name the experts in one of two ways::

    per-expert Linear modules (transformers 4.x models, experts a ModuleList):
        model.layers.3.block_sparse_moe.experts.5.w1.lora_A.weight   [r, H]    (Mixtral: w1 w3 w2)
        model.layers.3.mlp.experts.5.gate_proj.lora_B.weight         [I, r]    (Qwen-MoE, OLMoE)
    fused expert parameters (transformers 5.x, ``target_parameters``; peft's ``ParamWrapper``,
    two nested on one module: the inner is ``base_layer``):
        model.layers.3.mlp.experts[.base_layer].lora_A.weight   [E*r, in]   expert e: rows e*r..
        model.layers.3.mlp.experts[.base_layer].lora_B.weight   [out, E*r]  expert e: columns e::E
        gate_up_proj [E, 2I, H]: in H, out 2I (gate rows, then up: one A for both)
        down_proj    [E, H, I]:  in I, out H       (told apart by their shapes, not by nesting)

Either way each expert's projection gets ``y += scaling * (x A_e^T) B_e^T`` and the layer's
experts are stacked into one ``ExpertModuleLoRA`` (experts without an adapter: zeros), which
``lora/moe_layers.py`` copies into the layer's slot.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

PARTS = ("gate", "up", "down")


@dataclass(frozen=True)
class ExpertNames:
    """How a family's adapters name the experts under a decoder layer."""

    paths: tuple  # the experts module's path(s) under the layer ("mlp.experts", ...)
    parts: dict  # per-expert Linear name -> "gate" | "up" | "down"


@dataclass
class ExpertModuleLoRA:
    """One MoE layer's adapter, all experts stacked (float32, host), rank ``r`` zero-padded to
    the largest of its projections; each projection's scaling relative to ``scaling`` folded
    into its B."""

    a: dict  # part -> [E, r, in]
    b: dict  # part -> [E, out, r]
    scaling: float

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * 4 for t in (*self.a.values(), *self.b.values()))

    @property
    def rank(self) -> int:
        return max(t.shape[1] for t in self.a.values())


def match(names: ExpertNames, path: str) -> Optional[tuple]:
    """``(expert or None, part or None)`` when ``path`` (under a layer) is an expert's
    projection (per-expert naming) or the fused experts module (``None, None``); else None."""
    for prefix in names.paths:
        if path in (prefix, f"{prefix}.base_layer"):
            return None, None
        m = re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\.(\w+)", path)
        if m is not None and m.group(2) in names.parts:
            return int(m.group(1)), names.parts[m.group(2)]
    return None


def stack_layer(found: list, config: dict, shapes: dict, num_experts: int, max_rank: int,
                where: str, check) -> ExpertModuleLoRA:
    """``found``: ``[(expert or None, part or None, A, B, adapter module name)]`` of one layer
    -> the stacked module. ``shapes``: part -> (in, out) of one expert's projection; ``check
    (a, b, fan_in, fan_out, name)`` raises on a bad pair; scaling as PEFT's (``alpha_pattern``
    by the adapter's module name, ``use_rslora``)."""
    from tessellm.lora.peft import _next_pow2, _pattern

    per_part: dict = {}  # part -> {expert: (a, b, scaling)}
    for expert, part, a, b, name in found:
        a, b = a.float(), b.float()
        if expert is None:  # fused parameter: which one by shape
            fused, kind = _fused_parts(a, b, shapes, num_experts, where, name)
            rank = a.shape[0] // num_experts
            # the parameter's name, which rank_pattern / alpha_pattern match (peft's conversion of
            # transformers 4 targets writes ``.*\.gate_up_proj``: twice the rank and alpha)
            param = f"{name.removesuffix('.base_layer')}.{kind}"
            for part_name, (e_a, e_b) in fused.items():
                for e in range(num_experts):
                    per_part.setdefault(part_name, {})[e] = (e_a[e], e_b[e], param, rank)
            continue
        if expert >= num_experts:
            raise ValueError(f"{where} adapts expert {expert} ({name}), but the base model's "
                             f"layers have {num_experts} experts; it was trained for another model.")
        fan_in, fan_out = shapes[part]
        check(a, b, fan_in, fan_out, name)
        per_part.setdefault(part, {})[expert] = (a, b, name, a.shape[0])
    rank = max(r for experts in per_part.values() for *_, r in experts.values())
    if rank > max_rank:
        raise ValueError(f"{where} has rank {rank} on its experts, above max_lora_rank "
                         f"{max_rank}; start the engine with --max-lora-rank {_next_pow2(rank)} "
                         "or more.")
    scales = {}
    for part, experts in per_part.items():
        for e, (a, b, name, r) in experts.items():
            alpha = float(_pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", 8)))
            scales[(part, e)] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    scaling = next(iter(scales.values()))
    out = ExpertModuleLoRA({}, {}, scaling)
    for part in PARTS:
        fan_in, fan_out = shapes[part]
        out.a[part] = torch.zeros(num_experts, rank, fan_in)
        out.b[part] = torch.zeros(num_experts, fan_out, rank)
        for e, (a, b, name, r) in per_part.get(part, {}).items():
            ratio = scales[(part, e)] / scaling
            if not math.isfinite(ratio) or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"{where}: {name} has non-finite weights or scaling; the file "
                                 "is corrupt.")
            out.a[part][e, :r] = a
            out.b[part][e, :, :r] = b * ratio
    return out


def _fused_parts(a, b, shapes: dict, num_experts: int, where: str, name: str) -> tuple:
    """A fused parameter's A ``[E*r, in]`` and B ``[out, E*r]`` -> (part -> (A_e [E, r, in],
    B_e [E, out_part, r]), the parameter's name) (module docstring)."""
    hidden, inter = shapes["gate"][0], shapes["gate"][1]
    rows = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rows or rows % num_experts:
        raise ValueError(f"{where}: {name} has lora_A {tuple(a.shape)} and lora_B "
                         f"{tuple(b.shape)}, which are not the {num_experts} experts' stacked "
                         "LoRA matrices of the base model; the adapter was trained for another "
                         "model.")
    r = rows // num_experts
    a_e = a.reshape(num_experts, r, a.shape[1])
    b_e = b.reshape(b.shape[0], r, num_experts).permute(2, 0, 1)  # column j*E + e -> [e, :, j]
    if (a.shape[1], b.shape[0]) == (hidden, 2 * inter):
        return {"gate": (a_e, b_e[:, :inter]), "up": (a_e, b_e[:, inter:])}, "gate_up_proj"
    if (a.shape[1], b.shape[0]) == (inter, hidden):
        return {"down": (a_e, b_e)}, "down_proj"
    raise ValueError(f"{where}: {name} maps {a.shape[1]} -> {b.shape[0]} features, but the base "
                     f"model's experts map {hidden} -> {2 * inter} (gate_up_proj) and {inter} -> "
                     f"{hidden} (down_proj); the adapter was trained for another base model.")
