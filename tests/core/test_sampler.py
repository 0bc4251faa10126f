"""Sampling: seeds reproduce, filters and penalties shape distributions as references say."""

from __future__ import annotations

import pytest
import torch

from tessellm.core.sampler import Sampler, SamplingBatch, seed_for_position

V = 32


def batch(rows, temperature=1.0, top_k=None, top_p=None, min_p=None, seeds=None, logprobs=None):
    t = torch.full((rows,), float(temperature))
    return SamplingBatch(
        temperature=t, all_greedy=temperature == 0,
        top_k=None if top_k is None else torch.full((rows,), top_k, dtype=torch.int64),
        top_p=None if top_p is None else torch.full((rows,), float(top_p)),
        min_p=None if min_p is None else torch.full((rows,), float(min_p)),
        seeds=seeds, max_num_logprobs=logprobs)


def frequencies(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=V).float() / len(tokens)


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(V) * 2


N = 20000


def test_plain_sampling_follows_softmax(logits):
    out = Sampler(torch.device("cpu"), seed=1)(logits.expand(N, V), batch(N))
    assert torch.allclose(frequencies(out.token_ids), torch.softmax(logits, -1), atol=0.015)


def test_temperature_sharpens(logits):
    out = Sampler(torch.device("cpu"), seed=1)(logits.expand(N, V), batch(N, temperature=0.5))
    assert torch.allclose(frequencies(out.token_ids), torch.softmax(logits / 0.5, -1), atol=0.015)


def test_top_k_keeps_only_k_and_renormalises(logits):
    k = 5
    out = Sampler(torch.device("cpu"), seed=2)(logits.expand(N, V), batch(N, top_k=k))
    ref = torch.zeros(V)
    top = logits.topk(k).indices
    ref[top] = torch.softmax(logits[top], -1)
    assert set(out.token_ids.tolist()) <= set(top.tolist())
    assert torch.allclose(frequencies(out.token_ids), ref, atol=0.015)


def test_top_p_keeps_smallest_nucleus(logits):
    p = 0.6
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < p  # mass before each token under p
    ref = torch.zeros(V)
    ref[order[keep]] = probs[order[keep]] / probs[order[keep]].sum()
    out = Sampler(torch.device("cpu"), seed=3)(logits.expand(N, V), batch(N, top_p=p))
    assert set(out.token_ids.tolist()) <= set(order[keep].tolist())
    assert torch.allclose(frequencies(out.token_ids), ref, atol=0.015)


def test_min_p_drops_unlikely_tokens(logits):
    probs = torch.softmax(logits, -1)
    min_p = 0.2
    allowed = probs >= min_p * probs.max()
    ref = torch.where(allowed, probs, torch.zeros_like(probs))
    ref /= ref.sum()
    out = Sampler(torch.device("cpu"), seed=4)(logits.expand(N, V), batch(N, min_p=min_p))
    assert torch.allclose(frequencies(out.token_ids), ref, atol=0.015)


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "accelerator-forms"])
def test_min_p_comes_before_top_p_as_in_vllm(on_host):
    """vLLM applies min-p first (its built-in argmax-invariant processor), so top-p counts its
    mass over what min-p left: probabilities .5 .3 and many small ones, min_p .3 keeps .5 and
    .3 (.625 and .375 of what is left), top_p .6 then keeps the first alone. Top-p first (over
    the whole row: .5 < .6) would keep both."""
    logits = torch.full((V,), -30.0)
    logits[:2] = torch.tensor([0.5, 0.3]).log()
    logits[2:] = torch.tensor(0.2 / (V - 2)).log()
    sampler = Sampler(torch.device("cpu"), seed=5)
    sampler.on_host = on_host
    out = sampler(logits.expand(2000, V), batch(2000, top_p=0.6, min_p=0.3))
    assert set(out.token_ids.tolist()) == {0}


def test_seeded_rows_ignore_the_rest_of_the_batch(logits):
    seed = seed_for_position(42, 3)
    alone = Sampler(torch.device("cpu"), seed=0)(logits[None], batch(1, seeds=[(0, seed)]))
    many = torch.randn(6, V)
    many[4] = logits
    mixed = Sampler(torch.device("cpu"), seed=99)(many, batch(6, seeds=[(4, seed)]))
    assert alone.token_ids[0] == mixed.token_ids[4]
    draws = {Sampler(torch.device("cpu"))(logits[None], batch(1, seeds=[(0, seed_for_position(42, i))]))
             .token_ids.item() for i in range(40)}
    assert len(draws) > 1, "different positions must draw different noise"


def test_penalties_match_reference_formula():
    torch.manual_seed(5)
    rows = 4
    logits = torch.randn(rows, V)
    counts = torch.zeros(rows, V)
    prompt = torch.zeros(rows, V, dtype=torch.bool)
    for r in range(rows):
        counts[r, torch.randint(0, V, (6,))] += 1
        prompt[r, torch.randint(0, V, (4,))] = True
    pres = torch.tensor([0.0, 1.5, 0.0, 0.5])
    freq = torch.tensor([0.0, 0.0, 1.0, 0.7])
    rep = torch.tensor([1.3, 1.0, 1.0, 2.0])
    b = batch(rows, temperature=0)
    b.presence, b.frequency, b.repetition, b.output_counts, b.prompt_mask = pres, freq, rep, counts, prompt
    b.max_num_logprobs = 0
    out = Sampler(torch.device("cpu"))(logits, b)
    ref = logits.clone()
    seen = prompt | (counts > 0)
    ref = torch.where(seen, torch.where(ref > 0, ref / rep[:, None], ref * rep[:, None]), ref)
    ref = ref - freq[:, None] * counts - pres[:, None] * (counts > 0).float()
    assert torch.equal(out.token_ids, ref.argmax(-1))
    # Logprobs are reported from the raw logits, before penalties.
    raw_lp = torch.log_softmax(logits, -1).gather(-1, out.token_ids[:, None]).squeeze(-1)
    assert torch.allclose(out.sampled_logprob, raw_lp)


def test_logit_bias_and_banned_tokens(logits):
    b = batch(2, temperature=0)
    b.logit_bias = [(0, [3], [100.0])]
    b.banned = [(1, [int(logits.argmax())])]
    out = Sampler(torch.device("cpu"))(logits.expand(2, V), b)
    assert out.token_ids[0] == 3
    assert out.token_ids[1] == logits.topk(2).indices[1]


def test_top_k_candidates_path_masks_like_the_full_sort():
    """With ``top_k_max`` only that many candidates are sorted: the kept set must be the one
    the full-vocabulary sort keeps (per-row top-k, then top-p among them)."""
    from tessellm.core.sampling_filters import filter_dense, filter_top_k

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g) * 3
    top_k = torch.tensor([5, 40, 40, 1, 17, 40])
    top_p = torch.tensor([1.0, 0.5, 0.9, 1.0, 0.3, 0.99])
    full = filter_dense(logits, top_k, top_p)
    fast = filter_top_k(logits, top_k, top_p, k_max=40).dense(1000, -float("inf"))
    assert torch.equal(torch.isfinite(full), torch.isfinite(fast))
    assert torch.equal(full[torch.isfinite(full)], fast[torch.isfinite(fast)])
    assert torch.isfinite(fast).sum(-1).tolist()[0] == 5 and torch.isfinite(fast)[3].sum() == 1
