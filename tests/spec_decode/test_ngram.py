"""The vectorised n-gram search against a plain per-request reference."""

from __future__ import annotations

import numpy as np

from tessellm.spec_decode.ngram import propose_ngram


def reference(hist: list[int], nmin: int, nmax: int, k: int) -> list[int]:
    """Longest suffix n-gram (nmax down to nmin), latest earlier occurrence, next k tokens."""
    L = len(hist)
    for n in range(nmax, nmin - 1, -1):
        if L < n + 1:
            continue
        suffix = hist[L - n:]
        for end in range(L - 2, n - 2, -1):
            if hist[end - n + 1:end + 1] == suffix:
                return hist[end + 1:end + 1 + k]
    return []


def test_matches_reference_on_random_histories():
    rng = np.random.default_rng(0)
    histories = [list(rng.integers(0, v, size=n)) for v, n in
                 [(3, 40), (5, 17), (2, 3), (50, 30), (4, 1), (3, 2), (6, 64), (1000, 10)]]
    histories.append([1, 2, 3, 4, 9, 1, 2, 3, 4])  # a copy: drafts "9 1 2 3"
    tokens = np.zeros((len(histories), 80), dtype=np.int32)
    lens = np.zeros(len(histories), dtype=np.int64)
    for i, h in enumerate(histories):
        tokens[i, :len(h)] = h
        lens[i] = len(h)
    for nmin, nmax, k in [(1, 3, 4), (2, 5, 3), (3, 3, 7), (1, 1, 2)]:
        rows = np.arange(len(histories))[::-1]
        drafts, counts = propose_ngram(tokens, lens, rows, nmin, nmax, k)
        for j, r in enumerate(rows):
            want = [int(t) for t in reference(histories[r], nmin, nmax, k)]
            assert drafts[j, :counts[j]].tolist() == want, (r, nmin, nmax, k)
    drafts, counts = propose_ngram(tokens, lens, np.array([len(histories) - 1]), 2, 4, 4)
    assert drafts[0, :counts[0]].tolist() == [9, 1, 2, 3]


def test_candidate_search_matches_reference_on_copy_histories():
    """Copies with edits (long runs, ties between equally long matches, the suffix overlapping
    its match), rows of one or two tokens, and histories longer than their row's neighbours'."""
    rng = np.random.default_rng(1)
    histories = []
    for i in range(60):
        vocab = int(rng.choice([2, 4, 30]))
        base = list(rng.integers(0, vocab, size=int(rng.integers(1, 12))))
        h = (base * int(rng.integers(1, 5)))[:int(rng.integers(1, 40))]
        if h and rng.random() < 0.5:
            h[int(rng.integers(0, len(h)))] = int(rng.integers(0, vocab))
        histories.append(h)
    tokens = np.zeros((len(histories), 48), dtype=np.int32)
    lens = np.array([len(h) for h in histories], dtype=np.int64)
    for i, h in enumerate(histories):
        tokens[i, :len(h)] = h
    rows = rng.permutation(len(histories))
    for nmin, nmax, k in [(1, 5, 5), (2, 5, 8), (3, 4, 1), (2, 2, 3)]:
        drafts, counts = propose_ngram(tokens, lens, rows, nmin, nmax, k)
        for j, r in enumerate(rows):
            want = [int(t) for t in reference(histories[r], nmin, nmax, k)]
            assert drafts[j, :counts[j]].tolist() == want, (histories[r], nmin, nmax, k)


def test_batches_of_histories_shorter_than_the_longest_ngram():
    """Every history shorter than prompt_lookup_max (a one-token prompt and its first tokens):
    the suffix indices below the row's start are never read (this once raised IndexError in
    the engine loop, killing the server)."""
    for histories in ([[7, 7]], [[3, 4, 3]], [[1, 2, 1, 2], [5, 5]], [[9], [4, 4, 4]]):
        tokens = np.zeros((len(histories), 16), dtype=np.int32)
        lens = np.array([len(h) for h in histories], dtype=np.int64)
        for i, h in enumerate(histories):
            tokens[i, :len(h)] = h
        for nmin, nmax, k in [(1, 5, 3), (2, 5, 2), (1, 16, 4)]:
            drafts, counts = propose_ngram(tokens, lens, np.arange(len(histories)), nmin, nmax, k)
            for j, h in enumerate(histories):
                assert drafts[j, :counts[j]].tolist() == reference(h, nmin, nmax, k), (h, nmin, nmax)
