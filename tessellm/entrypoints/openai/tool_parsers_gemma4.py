"""Gemma 4's tool calls (``gemma4``): not JSON. Each call is one special-token pair around
``call:NAME{...}``; keys are bare, strings sit between ``<|"|>`` tokens, calls follow one
another with nothing between them::

    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3,tags:[<|"|>a<|"|>]}<tool_call|>

A bare value is JSON's ``true``, ``false``, ``null`` or a number; any other bare text is a
string (vLLM's reading), so ``NaN`` is the string ``"NaN"``, never a non-JSON number.

Contract as in ``tool_parsers_base.py``: a call's arguments come whole once its end token is
generated (its name once its ``{`` is); the reader looks at each character once and nests at
most ``MAX_DEPTH`` deep, so a parse is linear in the text.
"""

from __future__ import annotations

from typing import Any, Optional

from tessellm.entrypoints.openai.tool_parsers_base import (MAX_CALLS, ParsedToolCall, ParseResult, ToolParser,
                                                           arguments_json, decode_at, next_call, skip_ws)
from tessellm.reasoning.holdback import hold_back

START, END, QUOTE, CALL = "<|tool_call>", "<tool_call|>", '<|"|>', "call:"
MAX_DEPTH = 64  # deeper arguments: not a call


class Gemma4Parser(ToolParser):
    name = "gemma4"
    needs_special_tokens = True

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(START)
        if start < 0:
            return ParseResult(text if final else hold_back(text, START))
        calls, pos, tail = [], start, ""
        while True:
            end = text.find(END, pos)
            body = text[pos + len(START):end if end >= 0 else len(text)]
            if end < 0 and not final:
                brace = body.find("{")
                name = body[len(CALL):brace].strip() if body.startswith(CALL) and brace >= 0 else ""
                calls.append(ParsedToolCall(name or None, None))
                break
            call = _call(body)
            if call is None:
                return ParseResult(text)
            calls.append(call)
            if len(calls) > MAX_CALLS:
                return ParseResult(text if final else "")
            if end < 0:
                break
            pos, tail = next_call(text, end + len(END), final, (START,))
            if pos < 0:
                break
        return ParseResult(text[:start] + (tail or ""), calls)


def _call(body: str) -> Optional[ParsedToolCall]:
    """``call:NAME{...}`` (and nothing else but whitespace) as a call; None if it is not."""
    body = body.strip()
    brace = body.find("{")
    name = body[len(CALL):brace].strip() if body.startswith(CALL) and brace >= 0 else ""
    if not name:
        return None
    try:
        args, end = _Reader(body).value(brace, 0)
    except ValueError:
        return None
    arguments = arguments_json(args) if skip_ws(body, end) == len(body) else None
    return ParsedToolCall(name, arguments) if arguments is not None else None


class _Reader:
    """Gemma 4's values: ``{key:value,...}``, ``[value,...]``, ``<|"|>text<|"|>``, bare."""

    def __init__(self, text: str):
        self.text = text

    def value(self, i: int, depth: int) -> tuple[Any, int]:
        """The value at ``i`` and the position after it; ValueError where there is none."""
        text = self.text
        i = skip_ws(text, i)
        if depth > MAX_DEPTH or i >= len(text):
            raise ValueError("no value")
        if text.startswith(QUOTE, i):
            end = text.find(QUOTE, i + len(QUOTE))
            if end < 0:
                raise ValueError("unterminated string")
            return text[i + len(QUOTE):end], end + len(QUOTE)
        if text[i] == "{":
            return self._items(i + 1, "}", depth, keyed=True)
        if text[i] == "[":
            return self._items(i + 1, "]", depth, keyed=False)
        end = i
        while end < len(text) and text[end] not in ",}]":
            end += 1
        bare = text[i:end].strip()
        if not bare or bare[0] in "{[:" or QUOTE in bare:
            raise ValueError("not a value")
        value, stop = decode_at(bare, 0)  # strict JSON: true / false / null / a number
        if stop == len(bare) and not isinstance(value, (str, list, dict)):
            return value, end
        return bare, end

    def _items(self, i: int, close: str, depth: int, keyed: bool) -> tuple[Any, int]:
        text, items = self.text, ({} if keyed else [])
        i = skip_ws(text, i)
        if text.startswith(close, i):
            return items, i + 1
        while True:
            if keyed:
                colon = text.find(":", i)
                key = text[i:colon].strip() if colon >= 0 else ""
                if key.startswith(QUOTE) and key.endswith(QUOTE) and len(key) >= 2 * len(QUOTE):
                    key = key[len(QUOTE):-len(QUOTE)]
                if not key or any(c in key for c in "{}[],"):
                    raise ValueError("no key")
                value, i = self.value(colon + 1, depth + 1)
                items[key] = value
            else:
                value, i = self.value(i, depth + 1)
                items.append(value)
            i = skip_ws(text, i)
            if text.startswith(close, i):
                return items, i + 1
            if not text.startswith(",", i):
                raise ValueError(f"expected , or {close}")
            i = skip_ws(text, i + 1)


GEMMA4_PARSERS = {"gemma4": Gemma4Parser}
