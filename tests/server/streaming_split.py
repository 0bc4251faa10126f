"""What the streaming parser tests share: a text fed to one parser prefix by prefix, as a
stream's calls feed it (each returned string only grows), and fed blind (the text before a
bounded window overwritten), which shows a parser reads each delta and a bounded look-back,
never the settled text again."""

from __future__ import annotations

from typing import Callable


def streamed(split, text: str) -> tuple[str, str]:
    """Every prefix of ``text`` through one split: each string only grows; the last pair."""
    prev = ("", "")
    for i in range(len(text) + 1):
        reasoning, answer = split.split(text[:i], [], final=False)
        assert (reasoning or "").startswith(prev[0]) and answer.startswith(prev[1]), text[:i]
        prev = (reasoning or "", answer)
    return prev


def fed_blind(call: Callable[[str, bool], object], reference: Callable[[str, bool], object], text: str,
              step: int, window: int):
    """``text`` fed to ``call(text, final)`` ``step`` characters a call, each call's text with
    every character more than ``window`` before the previous call's end replaced by NUL: each
    result must equal ``reference`` (a fresh parse) of the true prefix, so the parser never read
    the blinded text (its markers are gone there). The last result."""
    seen = 0
    for cut in [*range(step, len(text), step), len(text)]:
        blind = max(0, seen - window)
        final = cut == len(text)
        got = call("\0" * blind + text[blind:cut], final)
        assert got == reference(text[:cut], final), (cut, got)
        seen = cut
    return got
