"""A real one-layer checkpoint whose weights make it a bigram table, so its greedy output is
known token for token (``thinking_model.py``: Llama; ``harmony_model.py``: gpt-oss).

The embedding is the identity (hidden size = vocabulary size) and the layer writes nothing to
the residual stream (its output projections zeroed), so the last hidden state is the
RMS-normalised one-hot of the current token and ``lm_head`` maps it to ``STRONG`` on its
successor plus small fixed noise on every token (which decides among the tokens a grammar
allows)."""

from __future__ import annotations

import math
from typing import Iterable

STRONG = 30.0  # the successor's logit; the noise is below 1


def successors(chains: Iterable[list[int]]) -> dict[int, int]:
    """Each token id's successor along ``chains``; a token with two is an error in the chains."""
    succ: dict[int, int] = {}
    for ids in chains:
        for a, b in zip(ids, ids[1:]):
            assert succ.setdefault(a, b) == b, f"token {a} has two successors"
    return succ


def make_bigram(model, succ: dict[int, int], silent: list) -> None:
    """Sets ``model``'s weights in place; ``silent``: the layer's tensors that write to the
    residual stream (zeroed). The noise comes from torch's generator (seed it first)."""
    import torch

    vocab = model.model.embed_tokens.weight.shape[0]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        for tensor in silent:
            tensor.zero_()
        model.model.norm.weight.fill_(1.0)
        head = torch.rand(vocab, vocab) / math.sqrt(vocab)
        for a, b in succ.items():
            head[b, a] = STRONG / math.sqrt(vocab)
        model.lm_head.weight.copy_(head)
