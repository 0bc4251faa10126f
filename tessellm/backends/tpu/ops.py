"""The tpu backend's ``FusedOps``: the reference ops (XLA fuses their elementwise chains
itself), with the Mixture-of-Experts in static shapes (``xla_moe.py``) instead of the reference
loop over experts, whose data-dependent shapes would sync and recompile as the routing moves."""

from __future__ import annotations

from tessellm.backends.reference.lora import ReferenceLoRAOps
from tessellm.backends.reference.ops import ReferenceOps
from tessellm.backends.tpu.xla_moe import (static_fused_experts, static_fused_experts_lora,
                                           static_fused_moe)


class XlaOps(ReferenceOps):
    def fused_moe(self, hidden, router_logits, w13, w2, top_k: int, scoring: str = "softmax",
                  renormalize: bool = True, w13_scale=None, w2_scale=None, **variant):
        """``FusedOps.fused_moe``, every shape static (``xla_moe.py``)."""
        return static_fused_moe(hidden, router_logits, w13, w2, top_k, scoring, renormalize,
                                w13_scale, w2_scale, **variant)

    def fused_experts(self, hidden, topk_weights, topk_ids, w13, w2, w13_scale=None,
                      w2_scale=None, **variant):
        """``FusedOps.fused_experts``, every shape static (``xla_moe.py``)."""
        return static_fused_experts(hidden, topk_weights, topk_ids, w13, w2, w13_scale,
                                    w2_scale, **variant)

    # every variant of reference/moe.py: activations and biases, block fp8, expert parallelism,
    # AWQ / GPTQ int4, GPTQ act order, bitsandbytes 4-bit
    fused_moe_activations = ("silu", "swiglu_oai", "relu2")
    fused_moe_block_fp8 = True
    fused_moe_expert_map = True
    fused_moe_int4 = True
    fused_moe_int4_act_order = True  # GPTQ act order's w13_perm (plugin API 20)
    fused_moe_bnb4 = True  # bitsandbytes 4-bit experts' bnb4_code (plugin API 26)


class XlaLoRAOps(ReferenceLoRAOps):
    """The reference LoRA ops with the MoE experts' adapters in static shapes
    (``xla_moe.static_fused_experts_lora``) instead of the reference's grouping of each
    expert's rows by slot on the host. The dense layers' shrink / expand are still the
    reference's (rows grouped by slot on the host: data-dependent shapes on XLA)."""

    name = "xla"
    fused_experts_lora = staticmethod(static_fused_experts_lora)
