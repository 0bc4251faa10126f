"""DeepSeek's MoE routing: which experts each token goes to, and with what weight.

The contract's ``fused_moe`` routes by plain top-k (softmax or sigmoid scores); DeepSeek routes
by groups, so its router runs here (plain torch, float32, on the replicated router logits) and
hands ``(weights, ids)`` to ``FusedOps.fused_experts``. Experts ``E`` are cut into ``n_group``
consecutive groups of ``E / n_group``; a token may only pick experts of its ``topk_group`` best
groups::

    E = 8, n_group = 4, topk_group = 2:   groups [0 1] [2 3] [4 5] [6 7]
    group score (V2: max, V3: sum of top 2)   .9    .3    .7    .1   -> groups 0 and 2 kept
    then the top k of experts 0, 1, 4, 5

DeepSeek-V2 (HF ``DeepseekV2TopkRouter``): softmax scores; ``topk_method`` "greedy" (plain top-k)
or "group_limited_greedy" (group score = the group's best expert, masked experts score 0);
weights = the chosen scores times ``routed_scaling_factor``.

DeepSeek-V3 (HF ``DeepseekV3TopkRouter``): sigmoid scores; the selection adds
``e_score_correction_bias`` (the load-balancing bias) and ranks groups by the sum of their two
best biased scores, masked experts score -inf; the weights are the *unbiased* scores of the
chosen experts, divided by their sum (+1e-20) when ``norm_topk_prob``, times
``routed_scaling_factor``.
"""

from __future__ import annotations

from typing import Optional

import torch

V2_METHODS = ("greedy", "group_limited_greedy")


def group_mask(choice: torch.Tensor, n_group: int, topk_group: int,
               group_score: str) -> torch.Tensor:
    """Bool ``[T, E]``: the experts of each token's ``topk_group`` best groups, groups ranked
    by their best score (``group_score`` "max") or the sum of their best two ("top2")."""
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)
    if group_score == "max":
        scores = grouped.max(dim=-1).values
    else:
        scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, torch.topk(scores, topk_group, dim=-1, sorted=False).indices, True)
    return keep[:, :, None].expand(t, n_group, e // n_group).reshape(t, e)


def route_v2(router_logits: torch.Tensor, top_k: int, method: str, n_group: int,
             topk_group: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: ``(weights [T, k] float32, ids [T, k] int64)``."""
    scores = router_logits.float().softmax(dim=-1)
    if method == "group_limited_greedy":
        keep = group_mask(scores, n_group, topk_group, "max")
        scores = scores.masked_fill(~keep, 0.0)
    weights, ids = torch.topk(scores, top_k, dim=-1, sorted=False)
    return weights * scaling, ids


def route_v3(router_logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int,
             topk_group: int, renormalize: bool,
             scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: ``(weights [T, k] float32, ids [T, k] int64)``; ``bias`` ``[E]`` steers the
    choice only."""
    scores = router_logits.float().sigmoid()
    choice = scores + bias.float()
    keep = group_mask(choice, n_group, topk_group, "top2")
    ids = torch.topk(choice.masked_fill(~keep, float("-inf")), top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def check_grouping(num_experts: int, top_k: int, n_group: Optional[int],
                   topk_group: Optional[int], need_two: bool) -> tuple[int, int]:
    """``(n_group, topk_group)`` validated (None: one group); refuses what cannot route."""
    n_group, topk_group = n_group or 1, topk_group or 1
    if num_experts % n_group:
        raise ValueError(f"n_routed_experts {num_experts} does not split into n_group {n_group} "
                         "groups; the config is inconsistent.")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group {topk_group} must be within 1..n_group ({n_group}).")
    if need_two and num_experts // n_group < 2:
        raise ValueError(f"DeepSeek-V3 routing ranks groups by their two best experts; n_group "
                         f"{n_group} leaves {num_experts // n_group} per group.")
    if top_k > topk_group * (num_experts // n_group):
        raise ValueError(f"num_experts_per_tok {top_k} is more than the {topk_group} groups of "
                         f"{num_experts // n_group} experts a token may use.")
    return n_group, topk_group


def route_biased_softmax(router_logits: torch.Tensor, bias: torch.Tensor, top_k: int,
                         norm_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ERNIE 4.5 MoE (HF ``Ernie4_5_MoeTopKRouter``): softmax scores; the experts are chosen by
    score + ``bias`` (``e_score_correction_bias``, the load-balancing bias), weighted by their
    unbiased scores divided by their sum (at least ``norm_min``). ``(weights [T, k] float32,
    ids [T, k] int64)``."""
    scores = router_logits.float().softmax(dim=-1)
    ids = torch.topk(scores + bias.float(), top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=norm_min), ids
