"""Reading a growing text once: what the streaming parsers that keep state across deltas share
(``inkling.InklingSplit``, ``muse_glimmer.GlimmerSplit``, the ``inkling`` tool parser).

A stream calls a parser with the whole output so far, each time a little longer. Such a parser
settles the text it has read (its pieces kept in ``Joined`` strings, its position in
``Growing``) and on the next call reads only what lies after: the new characters and a
bounded look-back (a marker's length: a marker split across deltas). ``Occurrences`` finds the
markers in one call's text, each marker's search resuming where it stopped.
"""

from __future__ import annotations

from typing import Callable, Sequence


class Growing:
    """Where the settled text ends (``pos``), and whether a text is the one seen before, grown:
    at least as long, with the same ``window`` characters before ``pos`` (a cheap check: a
    parser is fed one output; a text that fails it is parsed from its start)."""

    def __init__(self, window: int):
        self.window = window
        self.pos = 0
        self._seen = ""

    def continues(self, text: str) -> bool:
        return len(text) >= self.pos and text.startswith(self._seen, self.pos - len(self._seen))

    def settle(self, text: str, pos: int) -> None:
        self.pos, self._seen = pos, text[max(0, pos - self.window):pos]

    def walk(self, text: str, state: str, markers: Sequence[str], markers_in: Callable[[str], Sequence[str]],
             step: Callable[[str, str, str], str]) -> tuple[str, int, int]:
        """From the settled position, each marker met in turn: ``step(state, piece, marker)``
        (``piece``: the text before it) returns the state after it; ``markers_in(state)``: the
        markers that mean anything in ``state``. Returns the last state, where the text after
        the last marker starts, and how far the text is now settled (no marker starts before
        it unfound, ``window`` being the longest marker's length)."""
        pos = self.pos
        found = Occurrences(text, markers)
        while (hit := found.next(pos, markers_in(state)))[0] >= 0:
            at, marker = hit
            state = step(state, text[pos:at], marker)
            pos = at + len(marker)
        return state, pos, max(pos, len(text) - self.window + 1)


class Joined:
    """A string built by appending pieces, joined when read; ``kept`` is its length less
    trailing whitespace, ``blank`` whether it is only whitespace (both without a re-read)."""

    __slots__ = ("parts", "length", "kept", "blank")

    def __init__(self):
        self.parts: list[str] = []
        self.length = self.kept = 0
        self.blank = True

    def add(self, piece: str) -> None:
        if piece:
            self.parts.append(piece)
            stripped = len(piece.rstrip())
            if stripped:
                self.kept, self.blank = self.length + stripped, False
            self.length += len(piece)

    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""


class Occurrences:
    """The first of some markers at or after a position that only grows, in one text: each
    marker's search resumes where it stopped, so a text with many markers is read about once
    per marker kind (not once per marker met)."""

    def __init__(self, text: str, markers: Sequence[str]):
        self.text = text
        self.at = dict.fromkeys(markers, -2)  # -2: not searched yet; -1: none further on

    def next(self, pos: int, markers: Sequence[str]) -> tuple[int, str]:
        """``(where, which)`` of the first of ``markers`` at or after ``pos`` (ties: the
        smaller string); ``(-1, "")`` for none."""
        best = (-1, "")
        for m in markers:
            at = self.at[m]
            if at == -2 or 0 <= at < pos:
                at = self.at[m] = self.text.find(m, pos)
            if at >= 0 and (best[0] < 0 or (at, m) < best):
                best = (at, m)
        return best
