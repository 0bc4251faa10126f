"""How a prompt is cut to ``truncate_prompt_tokens`` tokens: vLLM's rule, one place for every path.

vLLM loads the tokenizer with ``truncation_side="left"`` for a generating model (a cut keeps the
prompt's *last* tokens: the end is what the model continues) and ``"right"`` for a pooling model
(a cut keeps the *first* tokens, as an HF / sentence-transformers user's ``tokenizer(text,
truncation=True, max_length=k)`` does). A text prompt is cut by the tokenizer itself, so its
special tokens stay; token ids are sliced as given::

    text, generate (left), k=3:    "a b c d e"  ->  [BOS] d e
    text, pooling (right), k=4:    "a b c d e"  ->  [CLS] a b [SEP]
    token ids, left / right, k=2:  [5 6 7 8]    ->  [7 8] / [5 6]

When k is smaller than the tokenizer's own special tokens, the tokenizer cannot cut (HF warns and
returns the text whole) and the ids are then sliced, as vLLM slices them after tokenizing.

The truncating calls go to a private copy of the tokenizer with the runner's side (the engine's
own tokenizer, shared with detokenizing and the user, is never mutated), one call at a time: an
HF fast tokenizer sets its truncation on the shared Rust object before each call, so two calls
with different lengths at once could swap them.
"""

from __future__ import annotations

import copy
import threading
from typing import Optional


def side_for(runner: str) -> str:
    """vLLM's tokenizer truncation side for a runner: ``right`` for pooling, else ``left``."""
    return "right" if runner == "pooling" else "left"


def cut_ids(ids: list[int], keep: Optional[int], side: str) -> list[int]:
    """``ids`` cut to ``keep`` tokens (None: all): the first ones for ``right``, else the last."""
    if keep is None or len(ids) <= keep:
        return list(ids)
    return list(ids[:keep]) if side == "right" else list(ids[len(ids) - keep:])


class PromptTruncator:
    """Truncating tokenizer calls with a fixed side (``side_for(runner)``)."""

    def __init__(self, side: str):
        if side not in ("left", "right"):
            raise ValueError(f"truncation side must be 'left' or 'right', got {side!r}.")
        self.side = side
        self._lock = threading.Lock()
        self._source = None  # the tokenizer the copy was made from (set_tokenizer may swap it)
        self._copy = None

    def encode(self, tokenizer, text: str, keep: Optional[int], add_special_tokens: bool = True) -> list[int]:
        """``text`` as token ids cut to ``keep`` tokens (None: whole), special tokens kept."""
        if keep is None:
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)
        out = self.tokenize(tokenizer, keep, text=text, add_special_tokens=add_special_tokens)
        return cut_ids(out["input_ids"], keep, self.side)

    def tokenize(self, tokenizer, max_length: int, **kwargs) -> dict:
        """``tokenizer(**kwargs, truncation=True, max_length=max_length)`` with this side (a text
        pair: HF's longest-first, each side cut at this end)."""
        with self._lock:
            return self._sided(tokenizer)(**kwargs, truncation=True, max_length=max_length)

    def _sided(self, tokenizer):
        if self._source is not tokenizer:
            sided = copy.deepcopy(tokenizer)
            sided.truncation_side = self.side
            self._source, self._copy = tokenizer, sided
        return self._copy
