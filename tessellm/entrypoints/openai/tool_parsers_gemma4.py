"""Gemma 4's tool calls (``gemma4``): not JSON. Each call is one special-token pair around
``call:NAME{...}``; keys are bare, strings sit between ``<|"|>`` tokens, calls follow one
another with nothing between them::

    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3,tags:[<|"|>a<|"|>]}<tool_call|>

A bare value is JSON's ``true``, ``false``, ``null`` or a number; any other bare text is a
string (vLLM's reading), so ``NaN`` is the string ``"NaN"``, never a non-JSON number.

Contract as in ``tool_parsers_base.py``: a call's arguments come whole once its end token is
generated (its name once its ``{`` is); the reader looks at each character once, nests at most
``MAX_DEPTH`` deep and reads at most ``MAX_VALUES`` values per output (it is Python, not a C
JSON decoder), and a stream reads each finished call once.
"""

from __future__ import annotations

from typing import Any, Optional

from tessellm.entrypoints.openai.tool_parsers_base import (ParsedToolCall, ParseResult, ToolParser, arguments_json,
                                                           decode_at, skip_ws, tagged_calls)
from tessellm.reasoning.holdback import hold_back

START, END, QUOTE, CALL = "<|tool_call>", "<tool_call|>", '<|"|>', "call:"
MAX_DEPTH = 64  # deeper arguments: not a call
MAX_VALUES = 4096  # more values in one output's calls: not a call (bounds the work per parse, as MAX_CALLS does)
_CONSTANTS = {"true": True, "false": False, "null": None}


class Gemma4Parser(ToolParser):
    name = "gemma4"
    needs_special_tokens = True

    def __init__(self, tokenizer=None, tools=None):
        super().__init__(tokenizer, tools)
        # call start -> (body, budget, call, values): a call read once per stream
        self._read: dict[int, tuple[str, int, Optional[ParsedToolCall], int]] = {}
        self._values = 0

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(START)
        if start < 0:
            return ParseResult(text if final else hold_back(text, START))
        self._values = 0  # read in this parse's calls so far
        return tagged_calls(text, start, start, final, (START, END), self._call)

    def _call(self, body: str, whole: bool, at: int) -> Optional[ParsedToolCall]:
        """The call opened at ``at``; read once per stream (a stream's earlier calls are the
        same text at the same place every delta)."""
        if not whole:
            brace = body.find("{")
            name = body[len(CALL):brace].strip() if body.startswith(CALL) and brace >= 0 else ""
            return ParsedToolCall(name or None, None)
        budget = MAX_VALUES - self._values  # what the calls before it left (another choice's differ)
        seen = self._read.get(at)
        if seen is None or seen[:2] != (body, budget):
            seen = self._read[at] = (body, budget, *_call(body, budget))
        self._values += seen[3]
        return seen[2]


def _call(body: str, budget: int) -> tuple[Optional[ParsedToolCall], int]:
    """``call:NAME{...}`` (and nothing else but whitespace) as a call, and its number of
    values; None if it is not one or holds more than ``budget`` values."""
    body = body.strip()
    brace = body.find("{")
    name = body[len(CALL):brace].strip() if body.startswith(CALL) and brace >= 0 else ""
    if not name:
        return None, 0
    reader = _Reader(body, budget)
    try:
        args, end = reader.value(brace, 0)
    except ValueError:
        return None, 0
    arguments = arguments_json(args) if skip_ws(body, end) == len(body) else None
    return (ParsedToolCall(name, arguments) if arguments is not None else None), budget - reader.budget


class _Reader:
    """Gemma 4's values: ``{key:value,...}``, ``[value,...]``, ``<|"|>text<|"|>``, bare."""

    def __init__(self, text: str, budget: int):
        self.text = text
        self.budget = budget  # values left to read
        self.comma = self.brace = self.bracket = -1  # the last found position of each delimiter

    def _bare_end(self, i: int) -> int:
        """Where the bare value at ``i`` ends: at the next ``,``, ``}`` or ``]``. Each
        delimiter's search goes on from where the last one found it, so all searches together
        read the text once."""
        text, n = self.text, len(self.text)
        if self.comma < i:
            self.comma = text.find(",", i) % (n + 1)  # not found (-1): n
        if self.brace < i:
            self.brace = text.find("}", i) % (n + 1)
        if self.bracket < i:
            self.bracket = text.find("]", i) % (n + 1)
        return min(self.comma, self.brace, self.bracket)

    def value(self, i: int, depth: int) -> tuple[Any, int]:
        """The value at ``i`` and the position after it; ValueError where there is none."""
        text = self.text
        if i < len(text) and text[i] in _WS:
            i = skip_ws(text, i)
        self.budget -= 1
        if depth > MAX_DEPTH or i >= len(text) or self.budget < 0:
            raise ValueError("no value")
        first = text[i]
        if first == "{" or first == "[":
            return self._items(i + 1, depth, keyed=first == "{")
        if text.startswith(QUOTE, i):
            end = text.find(QUOTE, i + len(QUOTE))
            if end < 0:
                raise ValueError("unterminated string")
            return text[i + len(QUOTE):end], end + len(QUOTE)
        end = self._bare_end(i)
        bare = text[i:end].strip()
        if not bare or first == ":" or QUOTE in bare:
            raise ValueError("not a value")
        constant = _CONSTANTS.get(bare, _CONSTANTS)
        if constant is not _CONSTANTS:
            return constant, end
        value, stop = decode_at(bare, 0)  # strict JSON: a number
        return (value, end) if stop == len(bare) and isinstance(value, (int, float)) else (bare, end)

    def _items(self, i: int, depth: int, keyed: bool) -> tuple[Any, int]:
        text, n = self.text, len(self.text)
        items, close = ({}, "}") if keyed else ([], "]")
        i = skip_ws(text, i)
        if i < n and text[i] == close:
            return items, i + 1
        while True:
            if keyed:
                colon = text.find(":", i)
                key = text[i:colon] if colon >= 0 else ""
                if key.startswith(QUOTE) and key.endswith(QUOTE) and len(key) >= 2 * len(QUOTE):
                    key = key[len(QUOTE):-len(QUOTE)]
                elif not _NOT_IN_KEY.isdisjoint(key):
                    raise ValueError("no key")
                key = key.strip()
                if not key:
                    raise ValueError("no key")
                items[key], i = self.value(colon + 1, depth + 1)
            else:
                value, i = self.value(i, depth + 1)
                items.append(value)
            if i < n and text[i] in _WS:
                i = skip_ws(text, i)
            if i < n and text[i] == close:
                return items, i + 1
            if i >= n or text[i] != ",":
                raise ValueError(f"expected , or {close}")
            i += 1
            if i < n and text[i] in _WS:
                i = skip_ws(text, i)


_WS = frozenset(" \t\r\n")
_NOT_IN_KEY = frozenset("{}[],")


GEMMA4_PARSERS = {"gemma4": Gemma4Parser}
