"""One output's text as reasoning and answer, whole or while it streams.

``ReasoningSplit.split(text, token_ids, final)`` is called with the whole output so far, so a
stream and a whole response go through the same code and reassemble to the same two strings.
While not ``final``, a trailing piece of text that could still become a marker (``"</thi"``) is
held back from both; each returned string only grows, so a stream sends their new tails::

    phase REASONING   [<think>] reasoning </think> answer       (no </think>: all reasoning)
    phase UNDECIDED   <think> reasoning </think> answer  |  answer   (opens with <think> or not)
    phase ANSWER      answer

When the end marker is one token, the split also needs that token among the output's ids, as
the engine core's grammar gate does (the same characters spelled from other tokens are text).
"""

from __future__ import annotations

from typing import Optional, Sequence

from tessellm.reasoning.holdback import hold_back
from tessellm.reasoning.parsers import ANSWER, UNDECIDED, ThinkMarkers


class ReasoningSplit:
    """Kept per streamed choice: the end marker is searched for only in text not searched yet,
    and the ids only among new ones (constant work per delta, not the whole output's)."""

    def __init__(self, markers: ThinkMarkers, phase: str):
        self.markers = markers
        self.phase = phase
        self._reset()

    def _reset(self) -> None:
        self._end_at: Optional[int] = None  # where the end marker starts in the body, once found
        self._search_from = 0  # the body before this holds no complete end marker
        self._ids_seen = 0
        self._has_end_id = False

    def split(self, text: str, token_ids: Sequence[int], final: bool) -> tuple[Optional[str], str]:
        """``(reasoning, answer)``; reasoning None when the output has none."""
        start = self.markers.parser.start
        if self.phase == ANSWER:
            return None, text
        if self.phase == UNDECIDED:
            if not text.startswith(start):
                if not final and start.startswith(text):
                    return None, ""  # it may still open with the marker
                return None, text
            return self._reasoning(text[len(start):], token_ids, final)
        if text.startswith(start):  # a model that repeats the marker the prompt opened
            text = text[len(start):]
        elif not final and start.startswith(text):
            return "", ""
        return self._reasoning(text, token_ids, final)

    def _reasoning(self, body: str, token_ids: Sequence[int], final: bool) -> tuple[str, str]:
        end, end_id = self.markers.parser.end, self.markers.end_id
        if len(body) < self._search_from or (self._end_at is not None and len(body) < self._end_at + len(end)):
            self._reset()  # not the text seen before: start over
        if self._end_at is None:
            if end_id is not None and not self._has_end_id:
                self._has_end_id = end_id in token_ids[self._ids_seen:]
                self._ids_seen = len(token_ids)
            if end_id is None or self._has_end_id:
                at = body.find(end, self._search_from)
                if at >= 0:
                    self._end_at = at
                else:
                    self._search_from = max(0, len(body) - len(end) + 1)
        if self._end_at is not None:
            return body[:self._end_at], body[self._end_at + len(end):]
        return (body if final else hold_back(body, end)), ""

