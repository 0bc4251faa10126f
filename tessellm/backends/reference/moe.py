"""Reference Mixture-of-Experts in plain torch: the oracle for ``FusedOps.fused_moe``.

Layout (the contract's, ``backends/spec.py``)::

    hidden        [T, H]                   the tokens (model dtype)
    router_logits [T, E]                   the router's output for each token
    w13           [E, 2I, H]               per expert: gate rows [0, I), up rows [I, 2I)
    w2            [E, H, I]                per expert: the down projection
    w13_scale     [E, 2I] float32 or None  fp8 per-output-channel scales of w13 (w13 is fp8)
    w2_scale      [E, H]  float32 or None  likewise for w2
    block_shape   (bn, bk) or None         block-wise fp8 experts (``quantization/fp8_block.py``):
                  the scales are then ``w13_scale [E, 2I/bn, ceil(H/bk)]`` and
                  ``w2_scale [E, ceil(H/bn), ceil(I/bk)]`` (one per block; 2I/bn whole:
                  the gate's rows end on a block boundary); keyword-only

    out[t] = sum over the top-k experts e of t:  weight[t, e] * w2[e] @ (silu(g) * u),
             [g | u] = w13[e] @ hidden[t]

Variant (gpt-oss): ``activation`` an ``ExpertActivation`` other than SiLU-and-mul, and
per-expert biases ``w13_bias [E, 2I]`` / ``w2_bias [E, H]`` added after each product (the
down bias inside the routing weight). Keyword-only; an ops object serves them only where it
lists the activation's ``kind`` in its ``fused_moe_activations`` attribute (default: SiLU
only, no biases), and the model falls back to this reference otherwise.

Routing: ``scoring`` "softmax" (Mixtral, Qwen-MoE) takes softmax over all E logits, then the
top k; "sigmoid" (DeepSeek-V3 style) takes sigmoid of each logit, then the top k. With
``renormalize`` the k weights are divided by their sum. Routing runs in float32.
``fused_experts_reference`` is the same product with the routing given (``topk_weights``,
``topk_ids``), for routers the contract's two scorings do not describe (DeepSeek's).

int4 experts (AWQ / GPTQ W4A16; keyword-only ``int4=True``): ``w13`` int32 ``[E, 2I, H/8]`` and
``w2`` int32 ``[E, H, I/8]``, each row's inputs packed 8 codes per word (low nibble first);
``w13_scale [E, 2I, H/g]`` / ``w2_scale [E, H, I/g]`` a float scale per group of g inputs (g
from the shapes: K / G, each projection its own); ``w13_zeros`` / ``w2_zeros`` uint8 zero codes
of the same shapes, or None for 8 (symmetric GPTQ)::

    W[e, n, k] = (q[e, n, k] - zeros[e, n, k // g]) * scale[e, n, k // g]   (float32, then cast)

GPTQ act-order int4 experts (keyword-only ``w13_perm``, int32 ``[E, H]``, with ``int4``): expert
e's ``w13`` inputs are stored in the order ``w13_perm[e]`` (the checkpoint's inputs sorted by
group, so that each group's inputs are contiguous), so its gate / up rows multiply
``hidden[t, w13_perm[e]]``; the down projection's act order is folded into the rows of ``w13``
at load (``layers/moe_int4.py``) and needs nothing here.

bitsandbytes 4-bit experts (keyword-only ``bnb4_code``, float32 ``[16]``: the layer's NF4 or FP4
table; ``layers/moe_bnb.py``): ``w13`` uint8 ``[E, 2I, H/2]`` and ``w2`` uint8 ``[E, H, I/2]``,
each row's inputs two codes a byte (high nibble first); ``w13_scale [E, 2I, H/bs]`` / ``w2_scale
[E, H, I/bs]`` the float32 absmax of each block of bs inputs of a row (bs from the shapes,
64 in every released model)::

    W[e, n, k] = code[q[e, n, k]] * absmax[e, n, k // bs]   (float32, then cast)

Expert parallelism (keyword-only ``expert_map``, an int tensor ``[E_global]``: global expert
id -> this rank's local index into ``w13`` / ``w2``, or -1 where another rank holds it): the
routing runs over all ``E_global`` logits as before, then each (token, slot) pair whose expert
maps to -1 contributes nothing; the others run their local expert. ``w13`` / ``w2`` (and their
scales and biases) hold the local experts only. Each rank's output is then the partial sum
over its experts, which the model's all-reduce adds up (``layers/moe.py``)::

    E_global = 4, 2 ranks     rank 0: expert_map [0, 1, -1, -1]   w13 [2, 2I, H] (experts 0, 1)
                              rank 1: expert_map [-1, -1, 0, 1]   w13 [2, 2I, H] (experts 2, 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class ExpertActivation:
    """What an expert applies to ``[gate | up]`` (``[n, 2I]``, gate first) to get ``[n, I]``.

    - "silu": ``silu(gate) * up`` (Mixtral, Qwen-MoE, every SwiGLU MLP);
    - "swiglu_oai" (gpt-oss's clamped SwiGLU; HF ``GptOssExperts._apply_gate``): gate clamped
      above at ``limit``, up to ``[-limit, limit]``, then ``(up + 1) * gate * sigmoid(alpha *
      gate)``;
    - "relu2" (Nemotron-H's experts, which have no gate: ``w13`` is ``[E, I, H]``, the up rows
      alone): ``relu(up) ** 2``.
    """

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    @property
    def gated(self) -> bool:
        """Whether ``w13`` holds gate and up rows (else up rows only)."""
        return self.kind != "relu2"

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu2":
            return torch.square(F.relu(gate_up))
        inter = gate_up.shape[-1] // 2
        gate, up = gate_up[..., :inter], gate_up[..., inter:]
        if self.kind == "silu":
            return F.silu(gate) * up
        if self.kind == "swiglu_oai":
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        raise ValueError(f"Expert activation {self.kind!r} is not supported; use 'silu', "
                         "'swiglu_oai' or 'relu2'.")


SILU = ExpertActivation()


def route(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
          renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k] float32, expert ids [T, k] int64)``, each row best expert first."""
    if scoring == "softmax":
        scores = torch.softmax(router_logits.float(), dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(router_logits.float())
    else:
        raise ValueError(f"MoE scoring {scoring!r} is not supported; use one of {SCORINGS}.")
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def dequantize_experts(w: torch.Tensor, scale: Optional[torch.Tensor], dtype,
                       block_shape=None, zeros: Optional[torch.Tensor] = None,
                       int4: bool = False,
                       bnb4_code: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``w`` as ``dtype``: fp8 weights times their per-output-channel ``scale`` ``[E, N]``, or
    with ``block_shape`` their block scales ``[E, Nb, Kb]``, or with ``int4`` packed int4 codes
    ``[..., N, K/8]`` with group scales and ``zeros``, or with ``bnb4_code`` bitsandbytes 4-bit
    codes ``[..., N, K/2]`` with block absmaxes (float32 products, then cast)."""
    if bnb4_code is not None:
        return dequantize_bnb4_experts(w, scale, bnb4_code, dtype)
    if int4:
        return dequantize_int4(w, scale, zeros, dtype)
    if scale is None:
        return w.to(dtype)
    if block_shape is not None:
        from tessellm.quantization.fp8_block import dequantize_block

        return dequantize_block(w, scale, block_shape, dtype)
    return (w.float() * scale.float()[..., None]).to(dtype)


def dequantize_int4(w: torch.Tensor, scale: torch.Tensor, zeros: Optional[torch.Tensor],
                    dtype) -> torch.Tensor:
    """int4 experts ``w [..., N, K/8]`` (module docstring) as ``dtype`` ``[..., N, K]``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w.device)
    # (torch.bitwise_right_shift, not ``>>``: torch-xla lowers ``>>`` of a negative int32 as a
    # rounded division, reading wrong codes from words with bit 31 set)
    q = torch.bitwise_right_shift(w[..., None], shifts) & 0xF
    q = q.reshape(*w.shape[:-1], w.shape[-1] * 8)
    group = q.shape[-1] // scale.shape[-1]
    z = 8.0 if zeros is None else zeros.float().repeat_interleave(group, -1)
    return ((q.float() - z) * scale.float().repeat_interleave(group, -1)).to(dtype)


def dequantize_bnb4_experts(w: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                            dtype) -> torch.Tensor:
    """bitsandbytes 4-bit experts ``w [..., N, K/2]`` (module docstring) as ``dtype``
    ``[..., N, K]``: ``code[q] * absmax`` in float32, then cast."""
    q = torch.stack([w >> 4, w & 0xF], dim=-1)  # [..., N, K/2, 2]: input 2j, then 2j + 1
    q = q.reshape(*w.shape[:-1], absmax.shape[-1], -1)  # [..., N, K/bs, bs]
    weights = code.float()[q.long()] * absmax.float()[..., None]
    return weights.reshape(*w.shape[:-1], -1).to(dtype)


def local_expert_ids(ids: torch.Tensor, expert_map: Optional[torch.Tensor]) -> torch.Tensor:
    """Global expert ids ``[T, k]`` -> this rank's local ids, -1 for experts held elsewhere
    (``ids`` unchanged without an ``expert_map``)."""
    if expert_map is None:
        return ids
    return expert_map.to(ids.device)[ids.long()]


def fused_moe_reference(hidden: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor,
                        w2: torch.Tensor, top_k: int, scoring: str = "softmax",
                        renormalize: bool = True, w13_scale: Optional[torch.Tensor] = None,
                        w2_scale: Optional[torch.Tensor] = None, *,
                        activation: ExpertActivation = SILU,
                        w13_bias: Optional[torch.Tensor] = None,
                        w2_bias: Optional[torch.Tensor] = None,
                        block_shape=None,
                        expert_map: Optional[torch.Tensor] = None, int4: bool = False,
                        w13_zeros: Optional[torch.Tensor] = None,
                        w2_zeros: Optional[torch.Tensor] = None,
                        w13_perm: Optional[torch.Tensor] = None,
                        bnb4_code: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The loop over experts; returns ``[T, H]`` in hidden's dtype. Experts run in hidden's
    dtype (as HF transformers does), their weighted outputs are summed in float32."""
    weights, ids = route(router_logits, top_k, scoring, renormalize)
    return fused_experts_reference(hidden, weights, ids, w13, w2, w13_scale, w2_scale,
                                   activation=activation, w13_bias=w13_bias, w2_bias=w2_bias,
                                   block_shape=block_shape, expert_map=expert_map, int4=int4,
                                   w13_zeros=w13_zeros, w2_zeros=w2_zeros, w13_perm=w13_perm,
                                   bnb4_code=bnb4_code)


def fused_experts_reference(hidden: torch.Tensor, topk_weights: torch.Tensor,
                            topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                            w13_scale: Optional[torch.Tensor] = None,
                            w2_scale: Optional[torch.Tensor] = None, *,
                            activation: ExpertActivation = SILU,
                            w13_bias: Optional[torch.Tensor] = None,
                            w2_bias: Optional[torch.Tensor] = None,
                            block_shape=None,
                            expert_map: Optional[torch.Tensor] = None, int4: bool = False,
                            w13_zeros: Optional[torch.Tensor] = None,
                            w2_zeros: Optional[torch.Tensor] = None,
                            w13_perm: Optional[torch.Tensor] = None,
                            bnb4_code: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The oracle of the optional ``FusedOps.fused_experts``: ``fused_moe_reference`` with the
    routing done by the caller (``topk_weights`` float32 and ``topk_ids`` ``[T, k]``: DeepSeek's
    grouped top-k, ``models/moe_routing.py``). Each weight multiplies its expert's output as
    given (no renormalization here). ``expert_map``: module docstring (ids are global)."""
    weights, ids = topk_weights, local_expert_ids(topk_ids, expert_map)
    dtype = hidden.dtype
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in range(w13.shape[0]):
        token_idx, slot = torch.where(ids == e)
        if token_idx.numel() == 0:
            continue
        up13 = dequantize_experts(w13[e], None if w13_scale is None else w13_scale[e], dtype,
                                  block_shape, None if w13_zeros is None else w13_zeros[e], int4,
                                  bnb4_code)
        down = dequantize_experts(w2[e], None if w2_scale is None else w2_scale[e], dtype,
                                  block_shape, None if w2_zeros is None else w2_zeros[e], int4,
                                  bnb4_code)
        x = hidden[token_idx]
        if w13_perm is not None:  # GPTQ act order: the inputs in w13's stored order
            x = x[:, w13_perm[e].long()]
        gate_up = F.linear(x, up13, None if w13_bias is None else w13_bias[e])
        act = activation(gate_up)
        y = F.linear(act, down, None if w2_bias is None else w2_bias[e])
        y = y * weights[token_idx, slot, None].to(dtype)
        out.index_add_(0, token_idx, y.float())
    return out.to(dtype)
