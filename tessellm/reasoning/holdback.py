"""Streaming's hold-back: while an output is not final, a trailing piece of its text that could
still become a marker (``"</thi"`` of ``"</think>"``, ``"<|"`` of ``"<|end|>"``) is not sent
yet, so each streamed string only grows. Used by the reasoning split, the tool-call parsers and
the harmony parser."""

from __future__ import annotations

from typing import Sequence


def held_back(text: str, markers: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of one of ``markers``."""
    for k in range(min(max(len(m) for m in markers) - 1, len(text)), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


def hold_back(text: str, marker: str) -> str:
    """``text`` without a trailing piece that could be the start of ``marker``."""
    return text[:len(text) - held_back(text, (marker,))]
