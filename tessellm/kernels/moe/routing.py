"""MoE routing in one Triton launch: router logits -> scores -> top k -> renormalised weights.

One program per token holds its whole row of ``E`` logits (``E`` <= 4096)::

    logits [T, E] (any float dtype) --float32--> softmax over E, or sigmoid of each
    top k: k rounds of (max, lowest index at the max, mask it out) -> ids [T, k] int32, best first
    weights [T, k] float32 = the k scores (/ their sum when renormalize)

The same semantics as the contract's reference (``backends/reference/moe.py``: ``route``), which
defines the order of the k experts only by score (``torch.topk``, ties in an unspecified order):
here equal scores go lowest expert id first. The scores are computed as torch's expressions
(``exp(x - max) / sum`` and ``1 / (1 + exp(-x))``), within a few float32 ulps of the reference.
At batch 1 this replaces torch's 4-5 launches (cast, softmax, topk, sum, divide).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.pdl import pdl_args, pdl_start

MAX_EXPERTS = 4096


@triton.jit
def topk_scores(row_ptr, E, K: tl.constexpr, K_P2: tl.constexpr, BLOCK_E: tl.constexpr,
                SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr):
    """One token's routing from its ``E`` logits at ``row_ptr``: ``(weights, ids)``, each
    ``[K_P2]`` (slots past K: weight 0, id 0), best first (module docstring)."""
    e = tl.arange(0, BLOCK_E)
    ok = e < E
    x = tl.load(row_ptr + e, mask=ok, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        num = tl.exp(x - tl.max(x, 0))
        scores = num / tl.sum(num, 0)
    scores = tl.where(ok, scores, -1.0)  # below every score (both lie in [0, 1])
    slots = tl.arange(0, K_P2)  # k padded to a power of two in registers (zero weights)
    top_w = tl.zeros([K_P2], dtype=tl.float32)
    top_i = tl.zeros([K_P2], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(scores, 0)
        idx = tl.min(tl.where(scores == best, e, BLOCK_E), 0)  # lowest id among equal scores
        top_w = tl.where(slots == j, best, top_w)
        top_i = tl.where(slots == j, idx, top_i)
        scores = tl.where(e == idx, -2.0, scores)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, 0)
    return top_w, top_i


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, E, stride_l, K: tl.constexpr,
                  K_P2: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
                  USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    top_w, top_i = topk_scores(logits_ptr + t * stride_l, E, K, K_P2, BLOCK_E, SIGMOID,
                               RENORMALIZE)
    slots = tl.arange(0, K_P2)
    tl.store(weights_ptr + t * K + slots, top_w, mask=slots < K)
    tl.store(ids_ptr + t * K + slots, top_i, mask=slots < K)


def check_routing(router_logits: torch.Tensor, top_k: int, scoring: str) -> torch.Tensor:
    """The logits with a contiguous last dimension, after the checks of ``route_triton``."""
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"MoE scoring {scoring!r} is not supported; use softmax or sigmoid.")
    num_experts = router_logits.shape[1]
    if not 1 <= top_k <= num_experts or num_experts > MAX_EXPERTS:
        raise ValueError(f"Triton MoE routing takes 1 <= top_k <= num_experts <= {MAX_EXPERTS}, "
                         f"got top_k {top_k} of {num_experts} experts.")
    return router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()


def route_triton(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
                 renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k] float32, ids [T, k] int32)``, each row best expert first (module
    docstring). ``router_logits [T, E]``, last dimension contiguous."""
    router_logits = check_routing(router_logits, top_k, scoring)
    t, num_experts = router_logits.shape
    dev = router_logits.device
    weights = torch.empty(t, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=dev)
    if t:
        block = triton.next_power_of_2(num_experts)
        _route_kernel[(t,)](router_logits, weights, ids, num_experts, router_logits.stride(0),
                            K=top_k, K_P2=triton.next_power_of_2(top_k), BLOCK_E=block,
                            SIGMOID=scoring == "sigmoid", RENORMALIZE=renormalize,
                            num_warps=4 if block <= 1024 else 8, **pdl_args(dev))
    return weights, ids
