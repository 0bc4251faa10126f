"""Batched multi-LoRA (SGMV/BGMV-style) Triton kernels: ``prepare`` groups the step's rows by
adapter slot once (``meta``), ``lora_shrink`` and ``lora_expand`` run one launch per projection
over the whole mixed batch. ``TritonLoRAOps`` is the contract's ``LoRAOps`` on top of them."""

from __future__ import annotations

import torch

from tessellm.kernels.lora.expand import lora_expand, lora_expand_slices
from tessellm.kernels.lora.meta import LoRABatchMeta, prepare
from tessellm.kernels.lora.moe import fused_experts_lora_triton
from tessellm.kernels.lora.shrink import lora_shrink
from tessellm.kernels.op_flags import LORA_OPS_FLAGS, drop_unowned_flags

__all__ = ["LoRABatchMeta", "TritonLoRAOps", "lora_expand", "lora_expand_slices", "lora_shrink",
           "prepare"]


class TritonLoRAOps:
    """The ``LoRAOps`` (backends/spec.py) of any backend that runs Triton (cuda, rocm)."""

    name = "triton"
    supports_graph_capture = True  # prepare, shrink and expand never read the device

    def __init_subclass__(cls, **kwargs):
        """A subclass that defines one of ``prepare`` / ``shrink`` / ``expand`` /
        ``expand_slices`` / ``fused_experts_lora`` itself captures only if it says so
        (``supports_graph_capture`` in its own body; ``op_flags.LORA_OPS_FLAGS``)."""
        super().__init_subclass__(**kwargs)
        drop_unowned_flags(cls, LORA_OPS_FLAGS)

    def prepare(self, token_slots: torch.Tensor, num_slots: int) -> LoRABatchMeta:
        if token_slots.dim() != 1:
            raise ValueError(f"token_slots must be 1-D, got shape {tuple(token_slots.shape)}.")
        return prepare(token_slots, num_slots)

    def shrink(self, x, lora_a, meta: LoRABatchMeta, out) -> None:
        lora_shrink(x, lora_a, meta, out)

    def expand(self, buf, lora_b, meta: LoRABatchMeta, scaling, out, out_offset: int = 0) -> None:
        lora_expand(buf, lora_b, meta, scaling, out, out_offset)

    def expand_slices(self, buf, lora_bs, meta: LoRABatchMeta, scaling, out, offsets) -> None:
        lora_expand_slices(buf, lora_bs, meta, scaling, out, offsets)

    def fused_experts_lora(self, hidden, topk_weights, topk_ids, w13, w2, token_slots, lora,
                           **variant):
        return fused_experts_lora_triton(hidden, topk_weights, topk_ids, w13, w2, token_slots,
                                         lora, **variant)
