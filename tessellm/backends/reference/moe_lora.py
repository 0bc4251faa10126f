"""Reference MoE experts with per-token LoRA adapters: the oracle of
``LoRAOps.fused_experts_lora`` (``ExpertLoRA`` in backends/spec.py holds the layouts).

``fused_experts_reference``'s loop over experts, with each routed pair's adapter added to its
expert's two products before the activation and before the routing weight::

    pair (t, e), s = token_slots[t]:
        c13 = x_t w13[e]^T            [2I]   c13[:I] += sc[s] * B_gate (A_gate x_t)
                                             c13[I:] += sc[s] * B_up   (A_up   x_t)
        y   = act(c13) w2[e]^T        [H]    y += sc[s] * B_down (A_down act(c13))
        out[t] += weight * y

Each LoRA term is formed in float32 and added to the product in float32, rounded once to the
activations' dtype. The pairs of one expert are split by slot on the host (a few slots per
step): correct on every device, not graph-capturable.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tessellm.backends.reference.moe import SILU, ExpertActivation, local_expert_ids


def _add_lora(c: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              scale: torch.Tensor) -> torch.Tensor:
    """``c + scale * (x a^T) b_i^T`` per part: ``a [n*R, K]``, ``b [N, R]`` (row block i of
    N/n rows takes shrink columns [i*R, (i+1)*R)); float32 sum, rounded once."""
    rank = b.shape[-1]
    parts = a.shape[0] // rank
    buf = x.float() @ a.float().t()  # [P, n*R]
    rows = b.shape[0] // parts
    delta = torch.cat([buf[:, i * rank:(i + 1) * rank] @ b[i * rows:(i + 1) * rows].float().t()
                       for i in range(parts)], dim=1)
    return (c.float() + scale.float() * delta).to(c.dtype)


def check_expert_lora(lora, w13: torch.Tensor, w2: torch.Tensor,
                      token_slots: torch.Tensor, hidden: torch.Tensor) -> None:
    """Shapes of ``lora`` (an ``ExpertLoRA``) against the experts; one sentence if off."""
    num_slots, experts = lora.w13_a.shape[:2]
    rank = lora.w13_b.shape[-1]
    want = {"w13_a": (num_slots, experts, lora.w13_a.shape[2], w13.shape[2]),
            "w13_b": (num_slots, experts, w13.shape[1], rank),
            "w2_a": (num_slots, experts, rank, w2.shape[2]),
            "w2_b": (num_slots, experts, w2.shape[1], rank)}
    for name, shape in want.items():
        got = tuple(getattr(lora, name).shape)
        if got != shape:
            raise ValueError(f"ExpertLoRA.{name} has shape {got}; expected {shape} for experts "
                             f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}.")
    if experts != w13.shape[0] or lora.w13_a.shape[2] % rank or w13.shape[1] % (
            lora.w13_a.shape[2] // rank):
        raise ValueError(f"ExpertLoRA w13_a {tuple(lora.w13_a.shape)} does not fit w13 "
                         f"{tuple(w13.shape)} with rank {rank}.")
    if tuple(lora.scaling.shape) != (num_slots,):
        raise ValueError(f"ExpertLoRA.scaling must be [{num_slots}], got "
                         f"{tuple(lora.scaling.shape)}.")
    if token_slots.dim() != 1 or token_slots.shape[0] != hidden.shape[0]:
        raise ValueError(f"token_slots must be [{hidden.shape[0]}] (one per token), got "
                         f"{tuple(token_slots.shape)}.")


def fused_experts_lora_reference(hidden: torch.Tensor, topk_weights: torch.Tensor,
                                 topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                                 token_slots: torch.Tensor, lora, *,
                                 activation: Optional[ExpertActivation] = None,
                                 w13_bias: Optional[torch.Tensor] = None,
                                 w2_bias: Optional[torch.Tensor] = None,
                                 expert_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[T, H]`` in hidden's dtype (module docstring); ``expert_map`` as in
    ``fused_experts_reference`` (``lora``'s expert dim is then this rank's experts)."""
    check_expert_lora(lora, w13, w2, token_slots, hidden)
    activation = activation or SILU
    ids = local_expert_ids(topk_ids, expert_map)
    slots = token_slots.to(torch.int64)
    dtype = hidden.dtype
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in range(w13.shape[0]):
        token_idx, pick = torch.where(ids == e)
        if token_idx.numel() == 0:
            continue
        x = hidden[token_idx]
        gate_up = F.linear(x, w13[e].to(dtype), None if w13_bias is None else w13_bias[e])
        pair_slots = slots[token_idx]
        for s in torch.unique(pair_slots[pair_slots >= 0]).tolist():
            rows = torch.nonzero(pair_slots == s).squeeze(1)
            gate_up[rows] = _add_lora(gate_up[rows], x[rows], lora.w13_a[s, e], lora.w13_b[s, e],
                                      lora.scaling[s])
        act = activation(gate_up)
        y = F.linear(act, w2[e].to(dtype), None if w2_bias is None else w2_bias[e])
        for s in torch.unique(pair_slots[pair_slots >= 0]).tolist():
            rows = torch.nonzero(pair_slots == s).squeeze(1)
            y[rows] = _add_lora(y[rows], act[rows], lora.w2_a[s, e], lora.w2_b[s, e],
                                lora.scaling[s])
        y = y * topk_weights[token_idx, pick, None].to(dtype)
        out.index_add_(0, token_idx, y.float())
    return out.to(dtype)
