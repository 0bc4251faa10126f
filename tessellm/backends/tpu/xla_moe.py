"""Mixture-of-Experts for the tpu backend in static shapes: a step's XLA program does not depend
on its routing.

The reference loop (``reference/moe.py``) picks each expert's tokens with ``torch.where(ids ==
e)``: on XLA each of those index tensors has a data-dependent shape, so every expert costs a
device-to-host sync and the step's program changes with the routing (a compile for each new
pattern of which experts got how many tokens). Here every shape depends only on the step's
padded token count T, the experts E, top-k k and the layer's sizes, all fixed per bucket, so a
bucket's program is compiled once, at start-up, whatever the routing. Two forms, chosen from
those static sizes alone:

- gathered (``T * k < E``: decode-sized steps): each (token, slot) pair gathers its expert's
  weights by index (the stored form: int4 codes, fp8 codes, their scales and zero codes),
  dequantizes them in the graph and runs one batched product per projection; reads T * k
  experts' weights, not E::

      for slot j < k:   W13 = dequant(w13[ids[:, j]])              [T, 2I, H]
                        y_j = dequant(w2[ids[:, j]]) @ act(W13 @ x)  [T, H]
      out = sum_j  weight[:, j] * y_j                                 (float32)

- dense (otherwise: prefill chunks, larger batches): every expert runs on every token, a chunk
  of experts at a time as one batched product, and the routing masks the sum. Each expert's
  weights are read once; E / k times the routed FLOPs::

      R[t, e] = weight of e among t's top k, else 0  (experts another rank holds: 0)
      out = sum_e  where(R[:, e] != 0, R[:, e] * expert_e(x), 0)     (float32)

As in the reference, experts run in hidden's dtype and their weighted outputs are summed in
float32; a pair whose expert is not routed adds an exact zero (``where``, so even an inf from
an unrouted expert cannot leak in). On a TPU a grouped matmul over tokens sorted by expert
(Pallas ``gmm``) would do only the routed work; not used (never run: no TPU here).
"""

from __future__ import annotations

from typing import Optional

import torch

from tessellm.backends.reference.moe import (SILU, ExpertActivation, dequantize_experts,
                                             local_expert_ids, route)
from tessellm.backends.reference.moe_lora import check_expert_lora

# The dense form's working set per chunk of experts, in elements (its dequantized weights plus
# its [chunk, T, .] activations); bounds the peak memory of a long prefill chunk.
DENSE_CHUNK_ELEMENTS = 1 << 26


def static_fused_moe(hidden, router_logits, w13, w2, top_k: int, scoring: str = "softmax",
                     renormalize: bool = True, w13_scale=None, w2_scale=None, **variant):
    """``FusedOps.fused_moe`` (``backends/spec.py``) in static shapes (module docstring)."""
    weights, ids = route(router_logits, top_k, scoring, renormalize)
    return static_fused_experts(hidden, weights, ids, w13, w2, w13_scale, w2_scale, **variant)


def static_fused_experts(hidden: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         w13_scale: Optional[torch.Tensor] = None,
                         w2_scale: Optional[torch.Tensor] = None, *,
                         activation: ExpertActivation = SILU,
                         w13_bias: Optional[torch.Tensor] = None,
                         w2_bias: Optional[torch.Tensor] = None, block_shape=None,
                         expert_map: Optional[torch.Tensor] = None, int4: bool = False,
                         w13_zeros: Optional[torch.Tensor] = None,
                         w2_zeros: Optional[torch.Tensor] = None,
                         w13_perm: Optional[torch.Tensor] = None,
                         bnb4_code: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``FusedOps.fused_experts`` in static shapes: the routing given (``[T, k]`` weights as
    they are, global ids), the variants of ``reference/moe.py`` (GPTQ act order's ``w13_perm``:
    each expert's inputs gathered in its stored order, as the reference does); returns
    ``[T, H]``."""
    ids = local_expert_ids(topk_ids, expert_map).long()
    valid = ids >= 0  # False: an expert another rank holds
    ids = ids.clamp(min=0)  # an index that exists; its weight is masked off
    experts = _Experts(w13, w2, w13_scale, w2_scale, w13_bias, w2_bias, w13_zeros, w2_zeros,
                       block_shape, int4, activation, hidden.dtype, w13_perm, bnb4_code)
    tokens, k = ids.shape
    if tokens * k < w13.shape[0]:
        out = _gathered(hidden, topk_weights, ids, valid, experts)
    else:
        out = _dense(hidden, topk_weights, ids, valid, experts)
    return out.to(hidden.dtype)


class _Experts:
    """One layer's expert tensors and how to run any subset of them (``pick``: an index tensor
    for the gathered form, a slice for the dense one)."""

    def __init__(self, w13, w2, s13, s2, b13, b2, z13, z2, block_shape, int4, activation, dtype,
                 perm=None, code=None):
        self.w13, self.w2, self.s13, self.s2, self.perm = w13, w2, s13, s2, perm
        self.code = code  # bnb4 experts' table (``reference/moe.py``)
        self.b13, self.b2, self.z13, self.z2 = b13, b2, z13, z2
        self.block_shape, self.int4, self.act, self.dtype = block_shape, int4, activation, dtype

    def count(self) -> int:
        return self.w13.shape[0]

    def sizes(self) -> tuple[int, int, int]:
        """(N rows of w13, H, I) as the experts compute them (int4: 8 codes a word, bnb4: 2 a
        byte)."""
        pack = 8 if self.int4 else 2 if self.code is not None else 1
        return self.w13.shape[1], self.w2.shape[1], self.w2.shape[2] * pack

    def weights(self, pick) -> tuple[torch.Tensor, torch.Tensor]:
        """The picked experts' ``w13 [P, N, H]`` and ``w2 [P, H, I]`` in the model dtype."""
        def take(t):
            return None if t is None else _take(t, pick)

        w13 = dequantize_experts(take(self.w13), take(self.s13), self.dtype, self.block_shape,
                                 take(self.z13), self.int4, self.code)
        w2 = dequantize_experts(take(self.w2), take(self.s2), self.dtype, self.block_shape,
                                take(self.z2), self.int4, self.code)
        return w13, w2

    def gate_up(self, hidden: torch.Tensor, w13: torch.Tensor, pick) -> torch.Tensor:
        """``hidden [T, H]`` through the picked experts' ``w13``: ``[T, N]`` for the gathered
        form (one expert a token), ``[c, T, N]`` for the dense one; under GPTQ act order each
        expert reads the inputs in its stored order (``hidden[:, perm[e]]``)."""
        gathered = not isinstance(pick, slice)
        if self.perm is None:
            out = torch.einsum("th,tnh->tn" if gathered else "th,cnh->ctn", hidden, w13)
        elif gathered:
            x = torch.gather(hidden, 1, self.perm.index_select(0, pick).long())  # [T, H]
            out = torch.einsum("th,tnh->tn", x, w13)
        else:
            x = hidden[:, self.perm[pick].long()]  # [T, c, H]
            out = torch.einsum("tch,cnh->ctn", x, w13)
        b13 = self.bias("w13", pick)
        if b13 is not None:
            out = out + (b13 if gathered else b13[:, None, :])
        return out

    def bias(self, which: str, pick) -> Optional[torch.Tensor]:
        b = self.b13 if which == "w13" else self.b2
        return None if b is None else _take(b, pick).to(self.dtype)


def _take(t: torch.Tensor, pick) -> torch.Tensor:
    return t[pick] if isinstance(pick, slice) else t.index_select(0, pick)


def _gathered(hidden, topk_weights, ids, valid, experts: _Experts, lora=None) -> torch.Tensor:
    """Slot by slot: each token's expert for that slot, gathered and run batched."""
    dtype = hidden.dtype
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for j in range(ids.shape[1]):
        pick = ids[:, j]
        w13, w2 = experts.weights(pick)  # [T, N, H], [T, H, I]
        gate_up = experts.gate_up(hidden, w13, pick)
        if lora is not None:
            gate_up = lora.add(gate_up, hidden, pick, "w13")
        act = experts.act(gate_up)
        y = torch.einsum("ti,thi->th", act, w2)
        b2 = experts.bias("w2", pick)
        if b2 is not None:
            y = y + b2
        if lora is not None:
            y = lora.add(y, act, pick, "w2")
        y = y * topk_weights[:, j, None].to(dtype)
        out = out + torch.where(valid[:, j, None], y, torch.zeros_like(y)).float()
    return out


def _dense(hidden, topk_weights, ids, valid, experts: _Experts, lora=None) -> torch.Tensor:
    """Every expert on every token, chunk by chunk, the routing as a mask."""
    dtype, num = hidden.dtype, experts.count()
    tokens = hidden.shape[0]
    # [T, k, E]: slot j of token t picked expert e (and that expert is held here)
    hit = (ids[..., None] == torch.arange(num, device=ids.device)) & valid[..., None]
    routed = hit.any(dim=1).t()  # [E, T]
    route_w = (hit * topk_weights.float()[..., None]).sum(dim=1).t()  # [E, T] float32
    n, h, i = experts.sizes()
    per_expert = tokens * (n + i + h) + n * h + h * i
    chunk = max(1, min(num, DENSE_CHUNK_ELEMENTS // max(1, per_expert)))
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, num, chunk):
        pick = slice(start, min(num, start + chunk))
        w13, w2 = experts.weights(pick)  # [c, N, H], [c, H, I]
        gate_up = experts.gate_up(hidden, w13, pick)
        if lora is not None:
            gate_up = lora.add(gate_up, hidden, pick, "w13")
        act = experts.act(gate_up)
        y = torch.einsum("cti,chi->cth", act, w2)
        b2 = experts.bias("w2", pick)
        if b2 is not None:
            y = y + b2[:, None, :]
        if lora is not None:
            y = lora.add(y, act, pick, "w2")
        y = y * route_w[pick, :, None].to(dtype)
        out = out + torch.where(routed[pick, :, None], y, torch.zeros_like(y)).float().sum(0)
    return out


def static_fused_experts_lora(hidden: torch.Tensor, topk_weights: torch.Tensor,
                              topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                              token_slots: torch.Tensor, lora, *,
                              activation: Optional[ExpertActivation] = None,
                              w13_bias: Optional[torch.Tensor] = None,
                              w2_bias: Optional[torch.Tensor] = None,
                              expert_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``LoRAOps.fused_experts_lora`` (``backends/spec.py``, ``ExpertLoRA``) in static shapes:
    the two forms above, each pair's adapter added to its expert's products by the same fixed
    shapes (no grouping of rows by slot on the host, as ``reference/moe_lora.py`` does)."""
    check_expert_lora(lora, w13, w2, token_slots, hidden)
    ids = local_expert_ids(topk_ids, expert_map).long()
    valid = ids >= 0
    ids = ids.clamp(min=0)
    experts = _Experts(w13, w2, None, None, w13_bias, w2_bias, None, None, None, False,
                       activation or SILU, hidden.dtype)
    adapters = _Adapters(lora, token_slots)
    tokens, k = ids.shape
    form = _gathered if tokens * k < w13.shape[0] else _dense
    return form(hidden, topk_weights, ids, valid, experts, adapters).to(hidden.dtype)


class _Adapters:
    """Each token's adapter on the picked experts' products: ``c + scaling[s] * B (A x)`` in
    float32, rounded once, for tokens with a slot (``s >= 0``); the others' rows unchanged."""

    def __init__(self, lora, token_slots: torch.Tensor):
        self.lora = lora
        slots = token_slots.long()
        self.has = slots >= 0  # [T]
        self.slots = slots.clamp(min=0)
        self.count, self.experts = lora.w13_a.shape[:2]

    def add(self, c: torch.Tensor, x: torch.Tensor, pick, which: str) -> torch.Tensor:
        a, b = (self.lora.w13_a, self.lora.w13_b) if which == "w13" else (self.lora.w2_a,
                                                                          self.lora.w2_b)
        rank = b.shape[-1]
        parts = a.shape[2] // rank
        scaling = self.lora.scaling.float()
        if not isinstance(pick, slice):  # gathered: c [T, N], x [T, K], pick [T]
            flat = self.slots * self.experts + pick
            at = a.flatten(0, 1).index_select(0, flat).float()  # [T, n*R, K]
            bt = b.flatten(0, 1).index_select(0, flat).float()  # [T, N, R]
            buf = torch.einsum("tk,trk->tr", x.float(), at).view(-1, parts, rank)
            delta = torch.einsum("tpr,tpnr->tpn", buf,
                                 bt.view(bt.shape[0], parts, -1, rank)).flatten(1)
            delta = scaling.index_select(0, self.slots)[:, None] * delta
            return torch.where(self.has[:, None], c.float() + delta, c.float()).to(c.dtype)
        # dense: c [E', T, N], x [T, K] (w13) or [E', T, K] (w2); each slot's term, masked
        xs = x.float() if x.dim() == 3 else x.float().expand(c.shape[0], *x.shape)
        delta = torch.zeros(c.shape, dtype=torch.float32, device=c.device)
        for s in range(self.count):  # a fixed count: the adapter slots
            a_s, b_s = a[s, pick].float(), b[s, pick].float()  # [E', n*R, K], [E', N, R]
            buf = torch.einsum("ctk,crk->ctr", xs, a_s)
            buf = buf.view(*buf.shape[:2], parts, rank)
            term = torch.einsum("ctpr,cpnr->ctpn", buf,
                                b_s.view(b_s.shape[0], parts, -1, rank)).flatten(2)
            mine = (self.slots == s) & self.has  # [T]
            delta = delta + torch.where(mine[None, :, None], scaling[s] * term,
                                        torch.zeros_like(term))
        return torch.where(self.has[None, :, None], c.float() + delta, c.float()).to(c.dtype)
