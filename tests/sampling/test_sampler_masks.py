"""The sampler's allowed_token_ids and ban masks on its own, in its host form (cpu) and the
sync-free forms an accelerator takes (``on_host = False``): sampled frequencies follow the
softmax renormalised over the allowed set (after top-k), masked tokens never come out,
logprobs stay the raw ones, and a row with nothing left takes token 0."""

from __future__ import annotations

import pytest
import torch

from tessellm.core.sampler import Sampler, SamplingBatch

V, N = 32, 20000
ALLOWED = [3, 7, 9, 20]


def _batch(rows: int, allowed_rows: list[int], temperature=1.0, top_k=None, banned=None, logprobs=None):
    mask = torch.ones(V, dtype=torch.bool)
    mask[ALLOWED] = False
    return SamplingBatch(temperature=torch.full((rows,), temperature), all_greedy=temperature == 0,
                         top_p=None, min_p=None,
                         top_k=None if top_k is None else torch.full((rows,), top_k, dtype=torch.int64),
                         top_k_max=top_k, banned=banned, max_num_logprobs=logprobs,
                         allowed_rows=allowed_rows or None, allowed_masks=[mask] * len(allowed_rows) or None)


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(V) * 2


def _sampler(on_host: bool) -> Sampler:
    sampler = Sampler(torch.device("cpu"), seed=3)
    sampler.on_host = on_host
    return sampler


def _restricted_softmax(logits, ids):
    probs = torch.zeros(V)
    probs[ids] = torch.softmax(logits[ids], -1)
    return probs


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "accelerator-forms"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_every_row_allowed_follows_the_restricted_softmax(logits, on_host, top_k):
    out = _sampler(on_host)(logits.expand(N, V), _batch(N, list(range(N)), top_k=top_k))
    ids = ALLOWED if top_k is None else sorted(ALLOWED, key=lambda t: -logits[t])[:top_k]
    freq = torch.bincount(out.token_ids, minlength=V).float() / N
    assert torch.allclose(freq, _restricted_softmax(logits, ids), atol=0.015)


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "accelerator-forms"])
def test_some_rows_allowed_leave_the_others_alone(logits, on_host):
    rows = 2000
    x = logits.expand(rows, V).clone()
    out = _sampler(on_host)(x, _batch(rows, list(range(0, rows, 2)), logprobs=1))
    even, odd = out.token_ids[0::2], out.token_ids[1::2]
    assert set(even.tolist()) <= set(ALLOWED)
    assert not set(odd.tolist()) <= set(ALLOWED)  # unrestricted rows reach other tokens
    assert torch.equal(x, logits.expand(rows, V))  # the logits are not written
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(out.sampled_logprob, raw[out.token_ids], atol=1e-5)  # raw, not renormalised


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "accelerator-forms"])
def test_greedy_and_nothing_left(logits, on_host):
    best = max(ALLOWED, key=lambda t: logits[t])
    greedy = _sampler(on_host)(logits.expand(2, V), _batch(2, [0], temperature=0.0))
    assert greedy.token_ids.tolist() == [best, int(logits.argmax())]
    everything = [(0, ALLOWED)]  # row 0: its allowed tokens banned too
    out = _sampler(on_host)(logits.expand(3, V), _batch(3, [0, 1], banned=everything))
    assert out.token_ids[0] == 0 and int(out.token_ids[1]) in ALLOWED
