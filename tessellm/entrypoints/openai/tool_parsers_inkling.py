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

Contract as in ``tool_parsers_base.py``. Linear: the parser keeps its stream's state
(``keeps_state``: each choice has its own) and each call reads only the text no earlier call
settled, the longest marker's length back (``tessellm/reasoning/scan.py``); an open tool
block's text is kept as it comes, its JSON decoded once, when it closes; a final call ends the
output (the next call starts over).
"""

from __future__ import annotations

from typing import Optional

from tessellm.entrypoints.openai.tool_parsers_base import (MAX_CALLS, ParsedToolCall, ParseResult, ToolParser,
                                                           call_from_object, decode_at, partial_name, skip_ws)
from tessellm.reasoning.holdback import held_back
from tessellm.reasoning.scan import Growing, Joined

MODEL = "<|message_model|>"
TEXT, THINK, CALL = "<|content_text|>", "<|content_thinking|>", "<|content_invoke_tool_json|>"
TEXT_KINDS = (TEXT, "<|content_invoke_tool_text|>", "<|content_tool_error|>")  # rendered as text
ENDS = ("<|end_message|>", "<|content_model_end_sampling|>")
MARKERS = (MODEL, THINK, CALL, *TEXT_KINDS, *ENDS)
LONGEST = max(map(len, MARKERS))


def _markers_in(state: str) -> tuple[str, ...]:
    return ENDS if state == CALL else MARKERS  # inside a JSON tool block only its end means anything


def _call(body: str) -> Optional[ParsedToolCall]:
    value, end = decode_at(body, skip_ws(body, 0))
    return call_from_object(value, ("args",)) if end > 0 and not body[end:].strip() else None


class InklingParser(ToolParser):
    name = "inkling"
    needs_special_tokens = True
    keeps_state = True

    def __init__(self, tokenizer=None, tools=None):
        super().__init__(tokenizer, tools)
        self._reset()

    def _reset(self) -> None:
        self._read = Growing(LONGEST)  # the text before ``_read.pos`` is settled
        self._state = MODEL  # the state at ``_read.pos`` (``_next_state``)
        self._content = Joined()
        self._calls: list[ParsedToolCall] = []  # the closed tool blocks' calls
        self._broken = False  # a tool block was not a call: it and those after it are text
        self._open_block()

    def _open_block(self) -> None:
        self._block = Joined()  # the open header's or tool block's settled text
        self._name: Optional[str] = None  # the open tool block's name, once ``partial_name`` tells it
        self._key, self._key_from = -1, 0  # where its '"name"' is; searched before this

    def parse(self, text: str, final: bool) -> ParseResult:
        if not self._read.continues(text):
            self._reset()  # not the text seen before, grown: start over
        state, pos, settled = self._read.walk(text, self._state, MARKERS, _markers_in, self._close)
        piece = text[pos:settled]
        if state == CALL and not self._broken or state == MODEL:
            self._block.add(piece)  # decided when the block closes
        elif state in (CALL, TEXT):
            self._content.add(piece)
        self._state = state
        self._read.settle(text, settled)
        result = self._result(state, text[settled:], final)
        if final:
            self._reset()  # the output ended: a next call parses another
        return result

    def _close(self, state: str, piece: str, marker: str) -> str:
        """The block (or header) in ``state`` ends with ``piece`` at ``marker``: the state after."""
        if state == CALL and not self._broken:
            body = self._block.text() + piece
            call = _call(body)
            self._broken = call is None or len(self._calls) == MAX_CALLS
            if self._broken:
                self._content.add(body)
            else:
                self._calls.append(call)
        elif state in (CALL, TEXT):
            self._content.add(piece)
        elif state == MODEL and marker in ENDS:  # a header that ends a block: text
            self._content.add(self._block.text() + piece)
        self._open_block()
        return self._next_state(state, marker)

    def _result(self, state: str, rest: str, final: bool) -> ParseResult:
        """The settled content and calls with the unsettled ``rest`` (in ``state``) after them."""
        tail, calls = "", list(self._calls)
        if state == CALL and not self._broken:
            call = _call(self._block.text() + rest) if final else ParsedToolCall(self._partial_name(rest), None)
            if call is None or len(calls) == MAX_CALLS:  # not a call: its text is content
                tail = self._block.text() + rest
                tail = tail if final else tail[:len(tail) - held_back(tail, ENDS)]
            else:
                calls.append(call)
        elif state == CALL:
            tail = rest if final else rest[:len(rest) - held_back(rest, ENDS)]
        elif state == TEXT:
            tail = rest if final else rest[:len(rest) - held_back(rest, MARKERS)]
        elif state == MODEL and final:  # text with no kind marker after it
            tail = self._block.text() + rest
        if self._content.blank and not tail.strip():
            return ParseResult("", calls)
        return ParseResult(self._content.text() + tail, calls)

    def _partial_name(self, rest: str) -> Optional[str]:
        """``partial_name`` of the open tool block: searched for from where it stopped; once
        told, kept (the first '"name"' key's string, closed, does not change)."""
        if self._name is None:
            body = self._block.text() + rest
            if self._key < 0:
                self._key = body.find('"name"', self._key_from)
                self._key_from = max(0, len(body) - len('"name"') + 1)
            if self._key >= 0:
                self._name = partial_name(body[self._key:])
        return self._name

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
