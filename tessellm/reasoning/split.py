"""One output's text as reasoning and answer, whole or while it streams.

``ReasoningSplit.split(text, token_ids, final)`` is called with the whole output so far, so a
stream and a whole response go through the same code and reassemble to the same two strings.
While not ``final``, a trailing piece of text that could still become a marker (``"</thi"``) is
held back from both; each returned string only grows, so a stream sends their new tails::

    phase REASONING   [<think>] reasoning </think> answer       (no </think>: all reasoning)
    phase UNDECIDED   <think> reasoning </think> answer  |  answer   (opens with <think> or not)
    phase ANSWER      answer

``<think>`` and ``</think>`` stand for any of the parser's spellings of its markers (granite's
"Here is my thought process:" or "Here's ..."). The answer may have an envelope of its own
(``AnswerEnvelope``: ERNIE's ``<response>`` ... ``</response>``). A parser with ``inline``
keeps the thinking in the answer, its start marker put back (``minimax_m2_append_think``);
one with ``trim_newline`` drops a newline just before and just after the end marker (step3p5);
one with a ``reasoning_label`` drops it where the reasoning opens with it (Gemma 4's
``<|channel>thought\n`` ...: a reasoning that may still become the label is held back); one
with ``drop_strays`` drops a start marker met anywhere in the reasoning and an end marker met
in the answer (``<think>a<think>b</think>c</think>d``: reasoning ``ab``, answer ``cd``; a
piece that may still become one is held back).

When each spelling of the end marker is one token, the split ends the thinking where the first
of those tokens among the output's ids is, as the engine core's grammar gate does (the same
characters spelled from other tokens are text: Qwen3's ``<tool_call>`` written in pieces).

Linear: each call searches only the text no earlier call searched (the marker's length back),
the stray markers too.
"""

from __future__ import annotations

from typing import Optional, Sequence

from tessellm.reasoning.holdback import held_back
from tessellm.reasoning.parsers import ANSWER, UNDECIDED, ThinkMarkers


def _opening(text: str, markers: Sequence[str]) -> Optional[str]:
    return next((m for m in markers if text.startswith(m)), None)


def _may_open(text: str, markers: Sequence[str]) -> bool:
    return any(m.startswith(text) for m in markers)


def _unlabelled(reasoning: str, label: str, complete: bool) -> str:
    """``reasoning`` without its opening ``label``; "" while it may still become the label."""
    if reasoning.startswith(label):
        return reasoning[len(label):]
    return "" if not complete and label.startswith(reasoning) else reasoning


class _Strays:
    """A growing text without any of ``markers`` (a parser's stray ones); while not
    ``complete``, also without a trailing piece that could still become one. Each character is
    searched about once: the kept text before ``pos`` is settled and not searched again."""

    def __init__(self, markers: Sequence[str]):
        self.markers = tuple(markers)
        self._longest = max(map(len, self.markers))
        self.reset()

    def reset(self) -> None:
        self.pos = 0  # the text before this is settled: its kept part is ``self.kept``
        self.kept: list[str] = []
        self._seen = ""  # the settled text's last characters: a grown text still has them

    def __call__(self, text: str, complete: bool) -> str:
        if len(text) < self.pos or not text.startswith(self._seen, self.pos - len(self._seen)):
            self.reset()  # not the text seen before, grown: start over
        pos = self.pos
        while hits := [(i, m) for m in self.markers if (i := text.find(m, pos)) >= 0]:
            at, marker = min(hits)
            self.kept.append(text[pos:at])
            pos = at + len(marker)
        # no marker starts before len - longest + 1 that is not already found: settled text
        settled = max(pos, len(text) - self._longest + 1)
        if settled > pos:
            self.kept.append(text[pos:settled])
        self.pos, self._seen = settled, text[max(0, settled - self._longest):settled]
        rest = text[settled:]
        tail = rest if complete else rest[:len(rest) - held_back(rest, self.markers)]
        if len(self.kept) > 1:
            self.kept = ["".join(self.kept)]
        return (self.kept[0] if self.kept else "") + tail


class _Finder:
    """The first of ``markers`` in a growing text, searching each character about once."""

    def __init__(self, markers: Sequence[str]):
        self.markers = tuple(markers)
        self.reset()

    def reset(self) -> None:
        self.at: Optional[int] = None  # where the first marker starts, once found
        self.found = ""  # which one
        self.searched = 0  # the text before this holds no complete marker

    def find(self, text: str) -> Optional[int]:
        if self.at is not None and len(text) < self.at + len(self.found) or len(text) < self.searched:
            self.reset()  # not the text seen before: start over
        if self.at is None:
            hits = [(i, m) for m in self.markers for i in (text.find(m, self.searched),) if i >= 0]
            if hits:
                self.at, self.found = min(hits)
            else:
                self.searched = max(0, len(text) - max(map(len, self.markers)) + 1)
        return self.at

    def held(self, text: str, final: bool) -> str:
        """``text`` less a trailing piece that could still become a marker (none once final)."""
        return text if final else text[:len(text) - held_back(text, self.markers)]


class AnswerEnvelope:
    """The answer inside its own markers: ``open`` dropped where the answer opens with it
    (after newlines), the answer cut at ``close``. Neither set: the answer as it is."""

    def __init__(self, open_: str, close: str):
        self.open = open_
        self._close = _Finder((close,)) if close else None

    def __call__(self, answer: str, final: bool) -> str:
        if self.open:
            body = answer.lstrip("\n")
            if body.startswith(self.open):
                answer = body[len(self.open):]
            elif not final and _may_open(body, (self.open,)):
                return ""
        if self._close is None:
            return answer
        at = self._close.find(answer)
        return answer[:at] if at is not None else self._close.held(answer, final)


class ReasoningSplit:
    """Kept per streamed choice: the end marker is searched for only in text not searched yet,
    and the ids only among new ones (constant work per delta, not the whole output's)."""

    def __init__(self, markers: ThinkMarkers, phase: str):
        self.markers = markers
        self.parser = markers.parser
        self.phase = phase
        self._end = _Finder(self.parser.ends)
        self._answer = AnswerEnvelope(self.parser.answer_open, self.parser.answer_close)
        self._end_ids = markers.end_token_ids  # None: the text decides
        self._ids_seen = 0
        self._end_token: Optional[str] = None  # the spelling of the first end token among the ids
        if self.parser.drop_strays:
            self._stray_starts = _Strays(self.parser.starts)
            self._stray_ends = _Strays((self.parser.end, *self.parser.end_alts))

    def split(self, text: str, token_ids: Sequence[int], final: bool) -> tuple[Optional[str], str]:
        """``(reasoning, answer)``; reasoning None when the output has none."""
        if self.parser.inline:  # the thinking is part of the answer, as the model wrote it
            return None, text if self.phase == ANSWER else self.parser.start + text
        reasoning, answer = self._split(text, token_ids, final)
        label = self.parser.reasoning_label
        complete = final or self._end.at is not None  # the reasoning is all there
        if label and reasoning:
            reasoning = _unlabelled(reasoning, label, complete)
        if self.parser.drop_strays and reasoning is not None:
            reasoning = self._stray_starts(reasoning, complete)
            answer = self._stray_ends(answer, final)
        return reasoning, self._answer(answer, final)

    def _split(self, text: str, token_ids: Sequence[int], final: bool) -> tuple[Optional[str], str]:
        starts = self.parser.starts
        if self.phase == ANSWER:
            return None, text
        opened = _opening(text, starts)
        if self.phase == UNDECIDED:
            if opened is None:
                if not final and _may_open(text, starts):
                    return None, ""  # it may still open with the marker
                return None, text
            return self._reasoning(text[len(opened):], token_ids, final)
        if opened is not None:  # a model that repeats the marker the prompt opened
            text = text[len(opened):]
        elif not final and _may_open(text, starts):
            return "", ""
        return self._reasoning(text, token_ids, final)

    def _reasoning(self, body: str, token_ids: Sequence[int], final: bool) -> tuple[str, str]:
        at = self._end.find(body) if self._end_ids is None or self._first_end_token(body, token_ids) else None
        trim = self.parser.trim_newline
        if at is not None:
            kept = self._end.found in self.parser.end_kept  # a tool-call section opens the answer
            reasoning, answer = body[:at], body[at if kept else at + len(self._end.found):]
            return (reasoning.removesuffix("\n"), answer.removeprefix("\n")) if trim else (reasoning, answer)
        held = self._end.held(body, final)
        return (held.removesuffix("\n") if trim and not final else held), ""

    def _first_end_token(self, body: str, token_ids: Sequence[int]) -> Optional[str]:
        """The spelling of the first end token among the ids, once there is one; from then on
        the text is searched for that spelling alone, past the copies of it written in pieces
        before the token (counted in the text of the ids before it; without ``decode``, none).
        Reads only the ids not read before."""
        if len(token_ids) < self._ids_seen:  # not the ids seen before: start over
            self._ids_seen, self._end_token, self._end = 0, None, _Finder(self.parser.ends)
        if self._end_token is None:
            at = next((i for i in range(self._ids_seen, len(token_ids)) if token_ids[i] in self._end_ids), None)
            self._ids_seen = len(token_ids)
            if at is not None:
                self._end_token = spelling = self._end_ids[token_ids[at]]
                self._end = _Finder((spelling,))
                decode = self.markers.decode
                for _ in range(decode(token_ids[:at]).count(spelling) if decode is not None else 0):
                    copy = body.find(spelling, self._end.searched)
                    if copy < 0:
                        break
                    self._end.searched = copy + len(spelling)
        return self._end_token
