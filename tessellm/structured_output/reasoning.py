"""Structured output after reasoning: the grammar starts once the model's thinking ended.

With ``--reasoning-parser`` the thinking is free text and the answer follows the constraint
(as vLLM). ``ReasoningGate`` wraps a request's ``RequestGrammar`` with its interface (the
scheduler, the mask fill and speculative decoding use it unchanged) and routes each accepted
output token: to the reasoning (the grammar neither advances nor masks) or to the grammar::

    phase REASONING   t0 t1 ... </think> | a0 a1 ...      grammar accepts a0 a1 ...
    phase UNDECIDED   <think> ... </think> | a0 ...      or   a0 a1 ...  (a0 masked by the grammar
                                                            plus <think>: the model may open a block)
    phase ANSWER      a0 a1 ...                            (the prompt closed the think block)

Invariant: where the answer starts is a function of the accepted output tokens alone (the first
complete end marker), kept as ``answer_from``; rolling back tokens (speculative drafts) moves it
back exactly, and a preempted request keeps its tokens and so its place: nothing is replayed.
A multi-token marker is matched on its token ids as ``ThinkMarkers`` encodes it (any of the
end's spellings ends the thinking); an undecided
output (mistral's) that starts a multi-token ``<think>`` is held to that marker's next token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from tessellm.reasoning.parsers import ANSWER, REASONING, UNDECIDED


class ReasoningGate:
    def __init__(self, grammar, start_ids: tuple[int, ...], end_ids: tuple[int, ...], phase: str,
                 other_end_ids: tuple[tuple[int, ...], ...] = ()):
        self.inner = grammar
        self.start_ids = start_ids
        self.end_ids = end_ids
        self.ends = (end_ids, *other_end_ids)  # any of them ends the thinking (granite's spellings)
        self.phase = phase
        self.tokens: list[int] = []  # accepted output tokens
        self.answer_from: Optional[int] = 0 if phase == ANSWER else None  # index of the answer's first

    # -- RequestGrammar's interface ------------------------------------------------------
    @property
    def future(self):
        return self.inner.future

    @property
    def matcher(self):
        return self.inner.matcher

    @property
    def error(self):
        return self.inner.error

    @property
    def ready(self) -> bool:
        return self.inner.ready

    @property
    def is_terminated(self) -> bool:
        return self.answer_from is not None and self.inner.is_terminated

    @property
    def constrains_next(self) -> bool:
        """Whether the next token is masked at all (no: free thinking, no mask row)."""
        return self.answer_from is not None or self._opening() is not None

    def accept(self, token_id: int) -> bool:
        n = len(self.tokens)
        if self.answer_from is not None:
            if not self.inner.accept(token_id):
                return False
            self.tokens.append(token_id)
            return True
        k = self._opening()
        if k is not None:  # undecided: the answer's first token, or the start marker's k-th
            if token_id == self.start_ids[k]:
                self.tokens.append(token_id)
                return True
            if k > 0 or not self.inner.accept(token_id):
                return False
            self.tokens.append(token_id)
            self.answer_from = n
            return True
        self.tokens.append(token_id)
        if self._ends_reasoning():
            self.answer_from = n + 1
        return True

    def rollback(self, num_tokens: int) -> None:
        if not num_tokens:
            return
        keep = len(self.tokens) - num_tokens
        if self.answer_from is not None:
            self.inner.rollback(len(self.tokens) - max(keep, self.answer_from))
            if keep < self.answer_from or (keep == self.answer_from and self.phase == UNDECIDED
                                           and keep == 0):
                self.answer_from = 0 if self.phase == ANSWER else None
        del self.tokens[keep:]

    def fill_bitmask(self, bitmask, row: int) -> None:
        if self.answer_from is not None:
            self.inner.fill_bitmask(bitmask, row)
            return
        k = self._opening()
        if k is None:
            bitmask[row] = -1  # thinking: every token
        elif k == 0:
            self.inner.fill_bitmask(bitmask, row)
            _allow(bitmask, row, self.start_ids[0])
        else:
            bitmask[row] = 0
            _allow(bitmask, row, self.start_ids[k])

    # -- where the output is -------------------------------------------------------------
    def _opening(self) -> Optional[int]:
        """Undecided and the output is a proper prefix of the start marker (k tokens of it):
        the next token either continues the marker or (k == 0) starts the answer."""
        if self.phase != UNDECIDED:
            return None
        k = len(self.tokens)
        if k < len(self.start_ids) and tuple(self.tokens) == self.start_ids[:k]:
            return k
        return None

    def _ends_reasoning(self) -> bool:
        first = len(self.start_ids) if self.phase == UNDECIDED else 0  # the end is after the opening
        return any(len(self.tokens) - first >= len(end) and tuple(self.tokens[-len(end):]) == end
                   for end in self.ends if end)


def _allow(bitmask, row: int, token_id: int) -> None:
    """Set token ``token_id``'s bit in ``bitmask[row]`` (int32 words, bit t % 32 of word t // 32)."""
    word, bit = divmod(token_id, 32)
    value = int(bitmask[row, word]) | (1 << bit)
    bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value


class PluginGate(ReasoningGate):
    """The gate for a ``--reasoning-parser-plugin`` parser, as vLLM drives one: the prompt's ids
    decide where the output starts (``is_reasoning_end(prompt)``: the template closed the
    block), then ``is_reasoning_end_streaming(prompt and output ids, [new id])`` after each
    accepted token. The parser's own cost is per call; the ids are a view, never copied."""

    def __init__(self, grammar, parser, prompt_token_ids: Sequence[int]):
        self.parser = parser
        self.prompt = list(prompt_token_ids)
        super().__init__(grammar, (), (), ANSWER if parser.is_reasoning_end(self.prompt) else REASONING)

    def _ends_reasoning(self) -> bool:
        return bool(self.parser.is_reasoning_end_streaming(_Joined(self.prompt, self.tokens), self.tokens[-1:]))


class _Joined(Sequence):
    """``a + b`` without the copy (a parser scans it from the end, or tests membership)."""

    def __init__(self, a: list, b: list):
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.a[i] if i < len(self.a) else self.b[i - len(self.a)]

    def __iter__(self):
        yield from self.a
        yield from self.b

    def __reversed__(self):
        yield from reversed(self.b)
        yield from reversed(self.a)
