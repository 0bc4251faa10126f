"""LoRA slots on a MoE layer's experts: ``FusedMoE`` plus every slot's per-expert A and B.

Per slot ``s`` and expert ``e`` of this rank (``FusedMoE.expert_ids``: all of them, or the
rank's share under expert parallelism), stacked as the ops' ``ExpertLoRA`` (backends/spec.py)::

    w13_a [S, E, 2R, H]        gate's A in rows [0, R), up's in [R, 2R)
    w13_b [S, E, 2I_r, R]      gate's B rows of this rank's I slice, then up's (as w13's rows)
    w2_a  [S, E, R, I_r]       down's A columns of this rank's I slice
    w2_b  [S, E, H, R]
    scaling [S] fp32

Under tensor parallelism each rank holds its slice of every expert's intermediate dimension
(``layers/moe.py``): gate/up's B rows and down's A columns are cut the same way, so each rank's
down LoRA term is a partial sum like its down product (``sum_r (a_r A_r^T) B^T = (a A^T) B^T``)
and the model's all-reduce adds both. A step in which no row uses an adapter runs the base
``FusedMoE`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tessellm.backends.reference.moe import SILU, route
from tessellm.backends.reference.moe_lora import fused_experts_lora_reference
from tessellm.backends.spec import ExpertLoRA
from tessellm.layers.moe import FusedMoE


class LoRAFusedMoE(nn.Module):
    """``FusedMoE`` with ``num_slots`` adapter slots of rank ``rank`` on its experts."""

    wraps_base = True  # ``base`` is the layer as loaded (as ``LoRALinear``'s)

    def __init__(self, base: FusedMoE, batch, num_slots: int, rank: int):
        super().__init__()
        self.base = base
        self.batch = batch
        self.rank = rank
        w13, w2 = base.w13, base.w2
        experts, hidden, local = w13.shape[0], w2.shape[1], base.local
        kw = dict(dtype=w13.dtype, device=w13.device)
        self.lora = ExpertLoRA(torch.zeros(num_slots, experts, 2 * rank, hidden, **kw),
                               torch.zeros(num_slots, experts, 2 * local, rank, **kw),
                               torch.zeros(num_slots, experts, rank, local, **kw),
                               torch.zeros(num_slots, experts, hidden, rank, **kw),
                               torch.zeros(num_slots, dtype=torch.float32, device=w13.device))
        ops = batch.ops
        self._op = getattr(ops, "fused_experts_lora", None) or fused_experts_lora_reference

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)  # expert_ids, load_expert, ...

    def _run(self, hidden, weights, ids) -> torch.Tensor:
        base = self.base
        variant = {} if base.expert_map is None else {"expert_map": base.expert_map}
        if base.activation != SILU:
            variant["activation"] = base.activation
        return self._op(hidden, weights, ids, base.w13, base.w2, self.batch.token_slots,
                        self.lora, **variant)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if self.batch.meta is None:
            return self.base(hidden, router_logits)
        base = self.base
        weights, ids = route(router_logits, base.top_k, base.scoring, base.renormalize)
        return self._run(hidden, weights, ids)

    def forward_routed(self, hidden, topk_weights, topk_ids) -> torch.Tensor:
        if self.batch.meta is None:
            return self.base.forward_routed(hidden, topk_weights, topk_ids)
        return self._run(hidden, topk_weights, topk_ids)

    # -- slots -----------------------------------------------------------------------------

    def set_slot(self, slot: int, module) -> None:
        """Fill ``slot`` with an ``experts.ExpertModuleLoRA`` (whole experts, all of them), or
        zeros (None: the adapter leaves this layer's experts alone)."""
        lora, r = self.lora, self.rank
        for t in (lora.w13_a, lora.w13_b, lora.w2_a, lora.w2_b):
            t[slot].zero_()
        lora.scaling[slot] = 0.0 if module is None else module.scaling
        if module is None:
            return
        base = self.base
        ids = base.expert_ids  # this rank's experts (global ids, in w13's order)
        k = module.rank
        start = base.tp.rank * base.local if base.sliced else 0
        local = base.local
        pick = slice(ids.start, ids.stop)
        for i, part in enumerate(("gate", "up")):
            lora.w13_a[slot, :, i * r:i * r + k].copy_(module.a[part][pick])
            lora.w13_b[slot, :, i * local:(i + 1) * local, :k].copy_(
                module.b[part][pick, start:start + local])
        lora.w2_a[slot, :, :k].copy_(module.a["down"][pick, :, start:start + local])
        lora.w2_b[slot, :, :, :k].copy_(module.b["down"][pick])

    def clear_slot(self, slot: int) -> None:
        self.set_slot(slot, None)


def wrap_experts(model: nn.Module, batch, num_slots: int, rank: int) -> dict:
    """Wrap each decoder layer's ``FusedMoE`` (``mlp.experts``) in a ``LoRAFusedMoE``; returns
    ``{layer index: LoRAFusedMoE}``. Dense layers have none; quantized (fp8) or ungated experts
    are left unwrapped: their layers take attention LoRA only (``worker.load_slot`` refuses an
    adapter with expert weights there)."""
    wrapped = {}
    for index in range(model.start_layer, model.end_layer):
        mlp = getattr(model.layers[index], "mlp", None)
        experts = getattr(mlp, "experts", None)
        if isinstance(experts, FusedMoE) and experts.quant is None and experts.activation.gated:
            mlp.experts = wrapped[index] = LoRAFusedMoE(experts, batch, num_slots, rank)
    return wrapped
