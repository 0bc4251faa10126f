"""Exact rejection sampling of draft tokens (Leviathan et al. 2023; Chen et al. 2023).

Per sampled row ``r`` of a verifying request (row j verifies draft ``d_j``; its last row, and
the single row of a request without drafts, is a *bonus* row with no draft)::

    accept d_j  with probability  min(1, p_j(d_j) / q_j(d_j))
    otherwise   sample the row from  max(0, p_j - q_j) / sum(max(0, p_j - q_j))   (recovered)
    bonus row   sample from  p_k                                                  (q = 0)

``p`` is the target's distribution after every sampling parameter (temperature, top-k/top-p,
min-p, penalties, bias, bans; greedy rows a point mass at the argmax), ``q`` the distribution the
draft was drawn from (a point mass for n-gram / replay / greedy drafting: then acceptance is
``p(d)`` and the recovered distribution is ``p`` without ``d``, renormalised). The request's
tokens are the drafts up to the first rejected row, then that row's token: the output is
distributed exactly as plain sampling from ``p`` (greedy: exactly its argmax).

Each row's token is written as ``d_j`` when accepted, else its recovered sample, so the
runner's ``accept(drafts, row_tokens)`` (first mismatch stops) reads the result: a rejected
row's sample is never its draft (the recovered distribution gives ``d_j`` no mass: rejection
needs ``p(d_j) < q(d_j)``). Vectorised over every row of the batch; no host sync.
"""

from __future__ import annotations

from typing import Optional

import torch


def rejection_sample(target_probs: torch.Tensor, draft_ids: torch.Tensor,
                     draft_probs: Optional[torch.Tensor] = None, has_draft_probs: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None,
                     seeds: Optional[list[tuple[int, int]]] = None) -> torch.Tensor:
    """Per row the token the rejection sampler keeps (see the module docstring).

    ``target_probs`` float32 [R, V]; ``draft_ids`` int64 [R], -1 on bonus rows; ``draft_probs``
    float32 [R, V] (rows where ``has_draft_probs`` [R] is True; others are point masses);
    ``seeds``: (row, seed) for rows drawing their randomness from their own generator.
    """
    rows, vocab = target_probs.shape
    is_draft = draft_ids >= 0
    d = draft_ids.clamp(min=0)
    q = torch.zeros_like(target_probs)
    q.scatter_(1, d[:, None], is_draft[:, None].to(q.dtype))  # one-hot drafts; 0 on bonus rows
    if draft_probs is not None:
        use = has_draft_probs if has_draft_probs is not None else is_draft
        q = torch.where(use[:, None], draft_probs.float(), q)
    u = torch.rand(rows, device=target_probs.device, generator=generator)
    noise = torch.empty_like(target_probs).exponential_(generator=generator)
    for row, seed in seeds or ():
        gen = torch.Generator(device=target_probs.device).manual_seed(seed)
        u[row] = torch.rand(1, device=target_probs.device, generator=gen)[0]
        noise[row].exponential_(generator=gen)
    p_d = target_probs.gather(1, d[:, None]).squeeze(1)
    q_d = q.gather(1, d[:, None]).squeeze(1)
    accepted = is_draft & (u * q_d < p_d)
    residual = (target_probs - q).clamp_(min=0)
    empty = residual.sum(dim=1, keepdim=True) <= 0  # only where the draft is surely accepted
    residual = torch.where(empty, target_probs, residual)
    recovered = (residual / noise).argmax(dim=1)  # sampling by the exponential trick
    return torch.where(accepted, d, recovered)
