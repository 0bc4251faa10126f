"""Inkling's typed message blocks (``inkling``), each marker a special token::

    <|message_model|><|content_thinking|>I should look it up.<|end_message|>
    <|message_model|><|content_text|>Let me check.<|end_message|>
    <|message_model|><|content_invoke_tool_json|>{"name": "get_weather", "args": {"city": "SF"}}<|end_message|>

Blocks come in any order and any number; ``<|content_model_end_sampling|>`` may end one
instead of ``<|end_message|>``. After ``<|message_model|>`` a header (an optional function
name) runs to the block's kind marker and is not content; the output opens in one (the prompt
ends with ``<|message_model|>``): text with no kind marker after it is content. A text block
(``<|content_text|>``), and the raw-tool and tool-error blocks (``<|content_invoke_tool_text|>``,
``<|content_tool_error|>``), are content, markers dropped; a JSON tool block is a call, its
``args`` object the arguments (``{}`` when absent); a thinking block is neither (with
``--reasoning-parser inkling`` it is the reasoning: tessellm/reasoning/inkling.py, which leaves
the other blocks to this parser). Content that is only whitespace is none.

A tool block that is not a call (not a JSON object with a ``name``, once it is closed or the
output is final; or past ``MAX_CALLS``) is content, its text where it stands, and so is every
tool block after it; the calls before it stay calls (a stream has sent them), unlike the
other parsers, whose text goes back to content whole (it holds no markers to drop here).

Contract as in ``tool_parsers_base.py``. Linear: each marker is searched for from where its
last search stopped (``_Markers``).
"""

from __future__ import annotations

from typing import Optional

from tessellm.entrypoints.openai.tool_parsers_base import (MAX_CALLS, ParsedToolCall, ParseResult, ToolParser,
                                                           call_from_object, decode_at, partial_name, skip_ws)
from tessellm.reasoning.holdback import held_back

MODEL = "<|message_model|>"
TEXT, THINK, CALL = "<|content_text|>", "<|content_thinking|>", "<|content_invoke_tool_json|>"
TEXT_KINDS = (TEXT, "<|content_invoke_tool_text|>", "<|content_tool_error|>")  # rendered as text
ENDS = ("<|end_message|>", "<|content_model_end_sampling|>")
MARKERS = (MODEL, THINK, CALL, *TEXT_KINDS, *ENDS)


class _Markers:
    """The next occurrence of each marker at or after a position that only grows: each
    marker's search resumes where it stopped, so a whole parse reads the text a few times."""

    def __init__(self, text: str):
        self.text = text
        self.at = {m: -2 for m in MARKERS}  # -2: not searched yet; -1: none further on

    def next(self, pos: int, markers=MARKERS) -> tuple[int, str]:
        """``(where, which)`` of the first of ``markers`` at or after ``pos`` (-1, "": none)."""
        best = (-1, "")
        for m in markers:
            at = self.at[m]
            if at == -2 or 0 <= at < pos:
                at = self.at[m] = self.text.find(m, pos)
            if at >= 0 and (best[0] < 0 or at < best[0]):
                best = (at, m)
        return best


def _call(body: str) -> Optional[ParsedToolCall]:
    value, end = decode_at(body, skip_ws(body, 0))
    return call_from_object(value, ("args",)) if end > 0 and not body[end:].strip() else None


class InklingParser(ToolParser):
    name = "inkling"
    needs_special_tokens = True

    def parse(self, text: str, final: bool) -> ParseResult:
        pieces: list[str] = []  # the content
        calls: list[ParsedToolCall] = []
        broken = False  # a tool block was not a call: it and those after it are text
        markers, pos, state = _Markers(text), 0, MODEL
        while True:
            at, marker = markers.next(pos, ENDS if state == CALL else MARKERS)
            piece = text[pos:at] if at >= 0 else text[pos:]
            whole = at >= 0 or final  # the piece can no longer grow
            if state == CALL and not broken:
                call = _call(piece) if whole else ParsedToolCall(partial_name(piece), None)
                broken = call is None or len(calls) == MAX_CALLS
                calls += [] if broken else [call]
            if state == CALL and broken:
                pieces.append(piece if whole else piece[:len(piece) - held_back(piece, ENDS)])
            elif state == TEXT or (state == MODEL and (at < 0 and final or marker in ENDS)):
                pieces.append(piece if whole else piece[:len(piece) - held_back(piece, MARKERS)])
            if at < 0:
                break
            pos = at + len(marker)
            state = self._next_state(state, marker)
        content = "".join(pieces)
        return ParseResult(content if content.strip() else "", calls)

    @staticmethod
    def _next_state(state: str, marker: str) -> str:
        """The state after ``marker`` met in ``state`` (MODEL: a header; TEXT: content, inside a
        text block or between blocks; THINK: a thinking block; CALL: a JSON tool block)."""
        if marker in ENDS:
            return TEXT
        if state == THINK:
            return CALL if marker == CALL else THINK  # other markers are part of the thinking
        if marker == MODEL:
            return MODEL
        return TEXT if marker in TEXT_KINDS else marker


INKLING_PARSERS = {"inkling": InklingParser}
