"""Mixture-of-Experts families on the llama decoder: Mixtral, Qwen2-MoE (shared expert),
Qwen3-MoE (q/k norm). Attention, norms and rotary are the llama family's; each layer's MLP is a
``SparseMoeBlock`` (router + ``FusedMoE``), or a dense MLP where the config says so
(Qwen-MoE's ``mlp_only_layers`` / ``decoder_sparse_step``).

Checkpoint names: the experts come one tensor per projection and expert
(``...experts.<e>.w1|w3|w2`` for Mixtral, ``...experts.<e>.gate_proj|up_proj|down_proj`` for
Qwen), or all experts' in two stacked tensors (``...experts.gate_up_proj`` / ``down_proj``, as
Qwen3-VL-MoE ships its language model; ``layers.moe.stacked_expert_weights``), and load into
our stacked ``w13`` / ``w2``; Mixtral's ``block_sparse_moe`` is our ``mlp``.
fp8 checkpoints add each expert projection's ``weight_scale`` (per tensor or channel) or
``weight_scale_inv`` (per block) beside it (``layers/moe_fp8.py``); AWQ / GPTQ checkpoints
store ``qweight`` / ``qzeros`` / ``scales`` (/ ``g_idx``) in its place (``layers/moe_int4.py``),
except in layers their ``modules_to_not_convert`` or ``dynamic`` rules leave float; the
attention and dense MLP linears take the model's quant method.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.moe import EXPERT_PARTS, FusedMoE, SparseMoeBlock, stacked_expert_weights
from tessellm.layers.moe_fp8 import expert_quant, missing_scales
from tessellm.layers.moe_int4 import INT4_KINDS, experts_excluded
from tessellm.models.layer_windows import window_by_layer_type, window_everywhere
from tessellm.models.decoder import DecoderMLP
from tessellm.models.llama import LlamaForCausalLM, _strip_prefix
from tessellm.quantization.bnb_stored import dense_form

_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\."
                     r"(weight|weight_scale|weight_scale_inv|input_scale|qweight|qzeros|scales"
                     r"|g_idx)$")
# the checkpoint's names of an expert's projections, by family (``experts_excluded``)
_HF_PARTS = {".mlp.": ("gate_proj", "up_proj", "down_proj"),
             ".block_sparse_moe.": ("w1", "w3", "w2")}
_STACKED = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class _MoeForCausalLM(LlamaForCausalLM):
    shared_expert = False
    moe_prefix = ".mlp."  # where a layer's experts sit in the checkpoint's names
    # False where the checkpoint stores experts as stacked 3-D parameters (Granite's), which
    # AWQ / GPTQ tools and bitsandbytes leave float: such a checkpoint's experts load float then
    int4_experts = True

    def __init__(self, config, ctx: ModelContext):
        # (asked only where a layer holds experts: a model whose layers are all dense MLPs,
        # mlp_only_layers, serves any scheme its linear layers take)
        sparse = any(self.is_sparse(config, i) for i in range(config.num_hidden_layers))
        self.expert_quant = (expert_quant(ctx.quant_spec)
                             if ctx.quant_method is not None and sparse else None)
        super().__init__(config, ctx)

    # -- per-family config -----------------------------------------------------------------

    def num_experts(self, config) -> int:
        return config.num_experts

    def expert_size(self, config) -> int:
        return config.moe_intermediate_size

    def renormalize(self, config) -> bool:
        return bool(getattr(config, "norm_topk_prob", False))

    def is_sparse(self, config, index: int) -> bool:
        step = getattr(config, "decoder_sparse_step", 1) or 1
        return (index not in (getattr(config, "mlp_only_layers", None) or [])
                and self.num_experts(config) > 0 and (index + 1) % step == 0)

    def mlp_bias(self, config) -> bool:
        return False

    def layer_expert_quant(self, config, ctx: ModelContext, index: int):
        """``expert_quant`` for layer ``index``'s experts: None where an int4 or bitsandbytes
        checkpoint leaves them float (``moe_int4.experts_excluded``, or a family whose experts
        no int4 tool or bnb quantizes: ``int4_experts`` False)."""
        quant = self.expert_quant
        if quant is None or not (quant.kind in INT4_KINDS
                                 or quant.kind == "bnb4" and quant.prequantized):
            return quant
        if not self.int4_experts:
            return None
        names = [f"model.layers.{index}{self.moe_prefix}experts.{e}.{part}"
                 for e in range(self.num_experts(config))
                 for part in _HF_PARTS.get(self.moe_prefix, _HF_PARTS[".mlp."])]
        return None if experts_excluded(ctx.quant_spec, names) else quant

    # -- layers ----------------------------------------------------------------------------

    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        if not self.is_sparse(config, index):
            return DecoderMLP(config, ctx)
        experts = FusedMoE(self.num_experts(config), config.hidden_size, self.expert_size(config),
                           config.num_experts_per_tok, ctx.ops,
                           renormalize=self.renormalize(config), tp=ctx.tp,
                           quant=self.layer_expert_quant(config, ctx, index),
                           expert_parallel=ctx.expert_parallel)
        shared = None
        if self.shared_expert and getattr(config, "shared_expert_intermediate_size", 0):
            shared = DecoderMLP(config, ctx, config.shared_expert_intermediate_size)
        return SparseMoeBlock(experts, config.hidden_size, self.num_experts(config), shared)

    def rename(self, name: str) -> str:
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Expert tensors go into the stacked ``w13`` / ``w2``; the rest as for llama."""
        loaded: set[str] = set()
        modules = dict(self.named_modules())
        filled: dict[str, set] = {}  # experts module -> (expert, checkpoint part) loaded

        def others():
            for name, tensor in weights:
                short = _strip_prefix(name)
                match = _EXPERT.match(self.rename(short)) if short else None
                stacked = _STACKED.match(self.rename(short)) if short and not match else None
                if stacked is not None:
                    if self._owns(stacked.group(1)):
                        self._load_stacked(modules, *stacked.groups(), tensor, filled, loaded)
                elif match is None:
                    yield name, dense_form(tensor)  # a bnb-quantized router: float
                elif self._owns(match.group(1)):
                    prefix, expert, part, attr = match.groups()
                    params = modules[prefix].load_expert(int(expert), part, tensor, attr)
                    loaded.update(f"{prefix}.{param}" for param in params)
                    if attr in ("weight", "qweight"):
                        filled.setdefault(prefix, set()).add((int(expert), EXPERT_PARTS[part]))

        loaded |= super().load_weights((self.rename_full(n), t) for n, t in others())
        for prefix, seen in filled.items():
            for expert in modules[prefix].expert_ids:  # this rank's (expert parallelism)
                for param, shard in (("w13", 0), ("w13", 1), ("w2", None)):
                    if (expert, (param, shard)) not in seen:
                        part = {0: "gate (w1)", 1: "up (w3)", None: "down (w2)"}[shard]
                        raise ValueError(f"The checkpoint has no {part} projection of expert "
                                         f"{expert} in {prefix}; is it complete?")
            missing_scales(modules[prefix], prefix)
        return loaded

    def _load_stacked(self, modules, prefix: str, kind: str, tensor, filled: dict,
                      loaded: set) -> None:
        """All experts' ``gate_up_proj`` or ``down_proj`` in one tensor, expert by expert."""
        experts, count = modules[prefix], self.num_experts(self.config)
        if tensor.shape[0] != count:
            raise ValueError(f"{prefix}.{kind} holds {tensor.shape[0]} experts in the checkpoint, "
                             f"the config {count}; the config does not match the weights.")
        for expert, part, weight in stacked_expert_weights(
                kind, tensor, self.config.hidden_size, self.expert_size(self.config),
                experts.expert_ids):  # this rank's experts only (expert parallelism)
            params = experts.load_expert(expert, part, weight)
            loaded.update(f"{prefix}.{param}" for param in params)
            filled.setdefault(prefix, set()).add((expert, EXPERT_PARTS[part]))

    def rename_full(self, name: str) -> str:
        short = _strip_prefix(name)
        return self.rename(short) if short is not None else name


class MixtralForCausalLM(_MoeForCausalLM):
    moe_prefix = ".block_sparse_moe."

    def num_experts(self, config) -> int:
        return config.num_local_experts

    def expert_size(self, config) -> int:
        return config.intermediate_size

    def renormalize(self, config) -> bool:
        return True  # Mixtral always renormalizes its top-k weights

    def is_sparse(self, config, index: int) -> bool:
        return True

    def rename(self, name: str) -> str:
        return name.replace(".block_sparse_moe.", ".mlp.")

    def attention_biases(self, config) -> tuple[bool, bool]:
        return False, False

    def layer_window(self, config, index: int) -> Optional[int]:
        return window_everywhere(config)


class Qwen2MoeForCausalLM(_MoeForCausalLM):
    shared_expert = True

    def attention_biases(self, config) -> tuple[bool, bool]:
        return bool(getattr(config, "qkv_bias", True)), False

    def layer_window(self, config, index: int) -> Optional[int]:
        return window_by_layer_type(config, index)


class Qwen3MoeForCausalLM(_MoeForCausalLM):
    qk_norm = True

    def layer_window(self, config, index: int) -> Optional[int]:
        return window_everywhere(config)
