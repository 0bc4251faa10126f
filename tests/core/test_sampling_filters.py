"""Candidate-set filtering and sampling equal the full-vocabulary reference: the same kept sets,
the same probabilities, the same tokens for seeded rows, the same logprob ranks."""

from __future__ import annotations

import pytest
import torch

from tessellm.core.sampler import Sampler, SamplingBatch, seed_for_position
from tessellm.core.sampling_filters import STAGES, filter_candidates, filter_dense

V = 6000  # wider than the first stage (256), narrower than the second (4,096) is not: see rows


def peaked_logits(rows: int, seed: int) -> torch.Tensor:
    """Rows from sharply peaked to nearly flat, so top-p sets range from 1 token to thousands
    (every stage, and the full sort, gets rows)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 6.0, rows)[:, None]
    return torch.randn(rows, V, generator=g) * scale


def params(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    top_k = torch.where(torch.rand(rows, generator=g) < 0.4,
                        torch.randint(1, 5000, (rows,), generator=g), torch.full((rows,), V))
    top_p = torch.where(torch.rand(rows, generator=g) < 0.8, torch.rand(rows, generator=g), torch.ones(rows))
    top_p[::5] = 1.0
    top_k[::5] = torch.randint(1, 300, (len(top_k[::5]),), generator=g)  # top-k alone
    return top_k, top_p


def assert_same_sets(logits, top_k, top_p, skip=None):
    ref = filter_dense(logits, top_k, top_p)
    got = filter_candidates(logits, top_k, top_p, skip=skip).dense(V, -float("inf"))
    rows = slice(None) if skip is None else ~skip
    assert torch.equal(torch.isfinite(ref[rows]), torch.isfinite(got[rows]))
    assert torch.equal(ref[rows][torch.isfinite(ref[rows])], got[rows][torch.isfinite(got[rows])])
    return torch.isfinite(ref).sum(-1)


@pytest.mark.interpreted  # on a GPU: tests/kernels/test_sampling_kernels.py
def test_triton_argmax_races_the_candidates():
    """The GPU sampler's argmax (tessellm.kernels.sampling, here under TRITON_INTERPRET) over
    candidate columns narrower than its block gives the same tokens as torch's."""
    from tessellm.kernels.sampling import argmax

    logits = peaked_logits(6, 10)
    b = batch(6, torch.full((6,), 0.7), top_k=torch.full((6,), 20), top_k_max=20,
              seeds=[(i, seed_for_position(5, i)) for i in range(6)])
    torch_tokens = Sampler(torch.device("cpu"))(logits, b).token_ids
    assert torch.equal(Sampler(torch.device("cpu"), argmax=argmax)(logits, b).token_ids, torch_tokens)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_candidates_keep_the_full_sort_sets(seed):
    logits = peaked_logits(40, seed)
    top_k, top_p = params(40, seed)
    kept = assert_same_sets(logits, top_k, top_p)
    assert kept.min() == 1 and kept.max() > STAGES[0], "rows must span the stages"


def test_rows_keeping_everything_give_dense_logits_with_the_others_masked():
    logits = peaked_logits(8, 3)
    top_k = torch.tensor([V, 5, V, 40, V, V, 3, V])
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.9, 1.0, 0.99, 0.2, 0.7])
    out = filter_candidates(logits, top_k, top_p)
    assert out.ids is None and out.values.shape == (8, V)
    assert torch.equal(out.values[[0, 4]], logits[[0, 4]])
    assert_same_sets(logits, top_k, top_p)


def test_skipped_rows_do_not_widen_the_others():
    logits = peaked_logits(6, 4)
    top_k = torch.full((6,), V)
    top_p = torch.tensor([1.0, 0.3, 1.0, 0.5, 1.0, 0.4])
    skip = top_p >= 1.0  # greedy rows: their filter does not matter
    out = filter_candidates(logits, top_k, top_p, skip=skip)
    assert out.ids is not None, "greedy rows must not force the dense form"
    assert_same_sets(logits, top_k, top_p, skip=skip)


def batch(rows, temperature, top_k=None, top_p=None, min_p=None, seeds=None, logprobs=None, top_k_max=None):
    b = SamplingBatch(temperature=temperature, all_greedy=False, top_k=top_k, top_p=top_p,
                      min_p=min_p, seeds=seeds, max_num_logprobs=logprobs)
    b.top_k_max = top_k_max
    return b


def reference_probs(logits, b: SamplingBatch) -> torch.Tensor:
    """The whole-vocabulary sampler in vLLM's order: temperature, min-p (of the whole row's
    softmax), full-sort top-k/top-p, softmax."""
    temp = torch.where(b.temperature == 0, torch.ones_like(b.temperature), b.temperature)
    scaled = logits / temp[:, None]
    if b.min_p is not None:
        probs = torch.softmax(scaled, -1)
        scaled = scaled.masked_fill(probs < b.min_p[:, None] * probs.max(-1, keepdim=True).values, -float("inf"))
    if b.top_k is not None or b.top_p is not None:
        scaled = filter_dense(scaled, b.top_k, b.top_p)
    return torch.softmax(scaled, -1)


def reference_seeded_tokens(logits, b: SamplingBatch) -> torch.Tensor:
    probs = reference_probs(logits, b)
    q = torch.stack([torch.empty(V).exponential_(generator=torch.Generator().manual_seed(s))
                     for _, s in b.seeds])
    return (probs / q).argmax(-1)


def batches(rows):
    torch.manual_seed(9)
    top_k, top_p = params(rows, 9)
    temp = torch.rand(rows) + 0.3
    seeds = [(i, seed_for_position(1000 + i, i)) for i in range(rows)]
    return {
        "plain": batch(rows, temp, seeds=seeds),
        "top-k (top_k_max)": batch(rows, temp, top_k=torch.full((rows,), 40), top_k_max=40, seeds=seeds),
        "top-p": batch(rows, temp, top_p=top_p, seeds=seeds),
        "top-k and top-p": batch(rows, temp, top_k=top_k, top_p=top_p, seeds=seeds),
        "min-p": batch(rows, temp, min_p=torch.full((rows,), 0.05), seeds=seeds),
        "all three": batch(rows, temp, top_k=top_k, top_p=top_p, min_p=torch.full((rows,), 0.1), seeds=seeds),
    }


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "accelerator-forms"])
@pytest.mark.parametrize("name", list(batches(2)))
def test_distributions_and_seeded_tokens_equal_the_full_vocabulary_sampler(name, on_host):
    """On the host and in the sync-free forms an accelerator takes (top_k_max candidates, else
    the full sort; no min-p columns)."""
    logits = peaked_logits(24, 5)
    b = batches(24)[name]
    sampler = Sampler(torch.device("cpu"))
    sampler.on_host = on_host
    got, ref = sampler.target_probs(logits, b), reference_probs(logits, b)
    assert torch.equal(got > 0, ref > 0)
    # Softmax over the candidate columns sums in another order than over the whole row:
    # equal to float32 rounding (bitwise here for top-p and min-p, a few ulp for top-k).
    assert torch.allclose(got, ref, rtol=5e-7, atol=0)
    assert torch.equal(sampler(logits, b).token_ids, reference_seeded_tokens(logits, b))


def test_greedy_rows_do_not_widen_min_p_columns():
    """A greedy row next to min-p rows: the min-p rows still race over their nonzero columns
    only (the greedy row keeps every probability but takes the argmax), tokens as the reference."""
    logits = peaked_logits(6, 11) + torch.linspace(0, 3, V)  # every row's set well under V/2
    temp = torch.tensor([0.0, 0.8, 0.8, 0.0, 1.1, 0.9])
    seeds = [(i, seed_for_position(77, i)) for i in range(6)]
    b = batch(6, temp, min_p=torch.tensor([0.0, 0.1, 0.2, 0.0, 0.05, 0.3]), seeds=seeds)
    sampler = Sampler(torch.device("cpu"))
    point = temp == 0
    probs = sampler._probs(sampler._scaled(logits, b, point), b, point)
    assert probs.ids is not None and probs.values.shape[1] < V // 2
    tokens = sampler(logits, b).token_ids
    ref = reference_seeded_tokens(logits, b)
    greedy = temp == 0
    assert torch.equal(tokens[greedy], logits[greedy].argmax(-1))
    assert torch.equal(tokens[~greedy], ref[~greedy])


def test_unseeded_candidate_rows_follow_the_filtered_distribution():
    """Noise drawn for candidate columns only: frequencies still follow the reference."""
    logits = (torch.randn(1, V, generator=torch.Generator().manual_seed(6)) * 4).expand(20000, V)
    b = batch(20000, torch.full((20000,), 0.9), top_p=torch.full((20000,), 0.8),
              min_p=torch.full((20000,), 0.02))
    tokens = Sampler(torch.device("cpu"), seed=1)(logits, b).token_ids
    ref = reference_probs(logits[:1], batch(1, b.temperature[:1], top_p=b.top_p[:1], min_p=b.min_p[:1]))[0]
    assert set(tokens.tolist()) <= set(ref.nonzero()[:, 0].tolist())
    freq = torch.bincount(tokens, minlength=V).float() / len(tokens)
    assert torch.allclose(freq, ref, atol=0.015)


def test_rank_counts_tokens_ahead_inside_and_outside_the_top_logprobs():
    logits = peaked_logits(12, 7)
    order = logits.argsort(-1, descending=True)
    ranks_wanted = torch.tensor([1, 2, 3, 5, 6, 50, 1, 4000, 2, 7, 3, 6000])
    tokens = order.gather(-1, (ranks_wanted - 1)[:, None]).squeeze(-1)
    logprobs = torch.log_softmax(logits, -1)
    full = (logprobs > logprobs.gather(-1, tokens[:, None])).sum(-1)
    for k in (0, 1, 5):
        for device_side in (False, True):
            sampler = Sampler(torch.device("cpu"))
            sampler.on_host = not device_side
            from tessellm.core.sampler import SamplerOutput, SamplingBatch
            out = SamplerOutput(tokens)
            sampler._logprobs(logits, tokens, SamplingBatch(None, True, None, None, None, max_num_logprobs=k), out)
            assert torch.equal(out.sampled_rank, full + 1)
            assert out.sampled_rank.tolist() == ranks_wanted.tolist()


def test_top_p_one_keeps_every_token():
    """A row with top_p = 1 (off) next to a top-p row: its float32 cumulative mass reaches 1.0
    before the tail ends, and ``before >= 1.0`` used to drop those tail tokens."""
    logits = peaked_logits(2, 8)
    top_p = torch.tensor([1.0, 0.5])
    out = filter_dense(logits, None, top_p)
    assert torch.isfinite(out[0]).all()
    assert torch.isfinite(out[1]).sum() < V
    assert torch.isfinite(filter_candidates(logits, None, top_p).dense(V, -float("inf"))[0]).all()


def test_inverse_cdf_never_picks_a_zero_probability_token():
    """Whole-vocabulary rows on the host: one uniform through the float64 cumulative
    distribution; the extreme uniforms land on the first and last nonzero tokens."""
    from tessellm.core.sampler import inverse_cdf

    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]] * 4)
    u = torch.tensor([0.0, 0.45, 1.0 - 2.0 ** -53, 0.2], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [1, 3, 4, 3]
    unnormalised = torch.tensor([[0.0, 3e-30, 0.0]], dtype=torch.float32)
    assert inverse_cdf(unnormalised, torch.tensor([1.0 - 2.0 ** -53], dtype=torch.float64)).tolist() == [1]


def test_plain_rows_follow_softmax_through_the_inverse_cdf():
    logits = (torch.randn(1, V, generator=torch.Generator().manual_seed(12)) * 3).expand(20000, V)
    b = batch(20000, torch.full((20000,), 0.7))
    tokens = Sampler(torch.device("cpu"), seed=2)(logits, b).token_ids
    ref = torch.softmax(logits[0] / 0.7, -1)
    freq = torch.bincount(tokens, minlength=V).float() / len(tokens)
    assert torch.allclose(freq, ref, atol=0.015)
    assert set(tokens.tolist()) <= set(ref.nonzero()[:, 0].tolist())
