"""The rejection sampler keeps the target's distribution exactly: chi-square tests at a fixed
significance (0.001) on thousands of draws, for a general draft distribution q, for one-hot q
(n-gram / replay), for the bonus row, and through ``Sampler.verify`` with temperature, top-k
and top-p. The generators are seeded, so each run draws the same samples."""

from __future__ import annotations

import torch

from tessellm.core.sampler import Sampler, SamplingBatch
from tessellm.spec_decode.rejection import rejection_sample

# chi-square critical values at significance 0.001, by degrees of freedom
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}
N = 20000


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of ``samples`` against ``probs`` (cells with zero probability must
    be empty: a sample there fails at once), and its degrees of freedom."""
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "a token with zero target probability was produced"
    expected = probs[support].double() * samples.numel()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def draws(p_rows: torch.Tensor, q_rows, seed: int) -> torch.Tensor:
    """N requests verifying one draft each (row 0: draft from q, row 1: bonus): [N, 2] row tokens."""
    g = torch.Generator().manual_seed(seed)
    v = p_rows.shape[1]
    one_hot_q = q_rows is None
    q0 = torch.full((v,), 1.0 / v) if one_hot_q else q_rows[0]
    drafts = torch.multinomial(q0.expand(N, v), 1, generator=g).squeeze(1)
    target = p_rows.repeat(N, 1)
    ids = torch.stack([drafts, torch.full_like(drafts, -1)], 1).reshape(-1)
    dp = None if one_hot_q else q_rows.repeat(N, 1)
    has = None if one_hot_q else (ids >= 0)
    return rejection_sample(target, ids, dp, has, g).reshape(N, 2), drafts


def first_tokens(rows: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """The request's first output token: the draft if row 0 kept it, else row 0's recovered token."""
    return rows[:, 0]


def test_general_q_first_token_follows_p():
    p = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    q = torch.tensor([0.30, 0.05, 0.20, 0.15, 0.10, 0.20])
    rows, drafts = draws(torch.stack([p, p]), torch.stack([q, torch.zeros(6)]), seed=1)
    stat, df = chi_square(first_tokens(rows, drafts), p)
    assert stat < CHI2_999[df], stat
    accepted = rows[:, 0] == drafts
    assert abs(accepted.float().mean().item() - torch.minimum(p, q).sum().item()) < 0.02
    stat, df = chi_square(rows[:, 1], p)  # the bonus row samples p itself
    assert stat < CHI2_999[df], stat


def test_one_hot_q_first_token_follows_p_with_zeros():
    p = torch.tensor([0.0, 0.5, 0.1, 0.0, 0.4, 0.0, 0.0])  # top-k-like support
    rows, drafts = draws(torch.stack([p, p]), None, seed=2)
    stat, df = chi_square(rows[:, 0], p)
    assert stat < CHI2_999[df], stat
    accepted = rows[:, 0] == drafts
    assert abs(accepted.float().mean().item() - p.sum().item() / 7) < 0.02  # P(accept) = E_d[p(d)]


def test_greedy_target_keeps_only_the_argmax():
    p = torch.tensor([0.0, 0.0, 1.0, 0.0])
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    rows, drafts = draws(torch.stack([p, p]), torch.stack([q, torch.zeros(4)]), seed=3)
    assert (rows == 2).all()


def test_two_drafts_second_token_given_first_accepted():
    """Request layout of k = 2: rows [d0, d1, bonus]; the second output token exists when d0 was
    accepted and then follows p1 (here independent of the first token)."""
    g = torch.Generator().manual_seed(4)
    p0 = torch.tensor([0.2, 0.5, 0.3])
    p1 = torch.tensor([0.6, 0.1, 0.3])
    q = torch.tensor([0.1, 0.3, 0.6])
    d = torch.multinomial(q.expand(N, 3), 2, replacement=True, generator=g)
    ids = torch.stack([d[:, 0], d[:, 1], torch.full((N,), -1)], 1).reshape(-1)
    target = torch.stack([p0, p1, p1]).repeat(N, 1)
    dp = torch.stack([q, q, torch.zeros(3)]).repeat(N, 1)
    rows = rejection_sample(target, ids, dp, ids >= 0, g).reshape(N, 3)
    stat, df = chi_square(rows[:, 0], p0)
    assert stat < CHI2_999[df], stat
    kept = rows[:, 0] == d[:, 0]
    stat, df = chi_square(rows[kept, 1], p1)
    assert stat < CHI2_999[df], stat


def test_sampler_verify_with_temperature_top_k_top_p():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 0.3, -1.0, 1.9, 0.0, -0.5, 1.0]])
    temp, top_k, top_p = 0.7, 4, 0.8
    # The expected distribution, by hand: temperature, the top 4, then the smallest prefix
    # whose mass before each kept token is under 0.8.
    probs = torch.softmax(logits[0] / temp, -1)
    order = probs.argsort(descending=True)[:top_k]
    kept = probs[order] / probs[order].sum()
    before = kept.cumsum(0) - kept
    expected = torch.zeros(8)
    expected[order[before < top_p]] = probs[order[before < top_p]]
    expected /= expected.sum()
    sampler = Sampler(torch.device("cpu"), seed=5)
    batch = SamplingBatch(torch.full((2 * N,), temp), False, torch.full((2 * N,), top_p),
                          torch.full((2 * N,), top_k), None)
    g = torch.Generator().manual_seed(6)
    q = torch.full((8,), 1.0 / 8)
    drafts = torch.multinomial(q.expand(N, 8), 1, generator=g).squeeze(1)
    ids = torch.stack([drafts, torch.full_like(drafts, -1)], 1).reshape(-1)
    out = sampler.verify(logits.expand(2 * N, 8), batch, ids, q.expand(2 * N, 8).clone(), ids >= 0)
    rows = out.token_ids.reshape(N, 2)
    for col in (0, 1):
        stat, df = chi_square(rows[:, col], expected)
        assert stat < CHI2_999[df], (col, stat)
