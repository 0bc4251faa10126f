"""Tool calls written as a Python list of calls with keyword arguments (Llama 3.2, Llama 4,
ToolACE)::

    [get_weather(city="Paris", unit="celsius"), get_time(tz='CET')]

``pythonic``: the output is that list; ``llama4_pythonic``: also inside Llama 4's
``<|python_start|>`` ... ``<|python_end|>``. Argument values are Python literals (strings,
numbers, True/False/None, lists, tuples and dicts of them): each call is parsed with ``ast``
and its values read with ``ast.literal_eval``; nothing is ever evaluated. An output that is not
such a list is content.

One linear scan splits the list into its calls (brackets and string literals tracked), so each
call is parsed once it is complete; while streaming, the call being written has its name as
soon as its ``(`` is generated.
"""

from __future__ import annotations

import ast
import json
from typing import Optional

from tessellm.entrypoints.openai.tool_parsers_base import (MAX_CALLS, ParsedToolCall, ParseResult, ToolParser,
                                                           after_tag)

_OPEN, _CLOSE = "([{", ")]}"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")


def _call(segment: str) -> Optional[ParsedToolCall]:
    """``name(key=literal, ...)`` as a call; None if it is anything else."""
    try:
        node = ast.parse(segment.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, ast.Name):
            return None
        if any(k.arg is None for k in node.keywords):  # **kwargs
            return None
        args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        return ParsedToolCall(node.func.id, json.dumps(args, ensure_ascii=False, allow_nan=False))
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


class _Scan:
    """The calls of ``[call, call, ...]`` from ``text[pos]`` (a ``[``): their spans, the name of
    an unfinished one, where the list ends, and whether the text stopped being such a list."""

    def __init__(self, text: str, pos: int):
        self.spans: list[tuple[int, int]] = []  # complete calls: text[a:b]
        self.partial: Optional[str] = None  # the call being written: its name once "(" came
        self.end = -1  # after the closing "]" (-1: not generated yet)
        self.bad = False  # not a list of calls
        self._run(text, pos + 1)

    def _run(self, text: str, i: int) -> None:
        depth, quote, start = 0, "", -1  # depth inside the current call
        while i < len(text):
            c = text[i]
            if quote:
                if c == "\\":
                    i += 1
                elif c == quote:
                    quote = ""
            elif depth == 0:  # between calls: a name, "(", or "," / "]"
                if c in " \t\r\n" or (c == "," and start < 0 and self.spans):
                    pass
                elif c == "]" and start < 0:
                    self.end = i + 1
                    return
                elif c in _NAME_CHARS:
                    start = i if start < 0 else start
                elif c == "(" and start >= 0:
                    self.partial, depth = text[start:i].strip(), 1
                else:
                    self.bad = True
                    return
            elif c in "'\"":
                quote = c
            elif c in _OPEN:
                depth += 1
            elif c in _CLOSE:
                depth -= 1
                if depth == 0:
                    self.spans.append((start, i + 1))
                    self.partial, start = None, -1
                    if len(self.spans) > MAX_CALLS:
                        self.bad = True
                        return
            i += 1


class PythonicParser(ToolParser):
    name = "pythonic"
    START: tuple[str, ...] = ()  # tags the list may come after
    END = ""  # a tag the list may be followed by

    def parse(self, text: str, final: bool) -> ParseResult:
        pos = after_tag(text, _skip(text, 0), self.START, final)
        if pos is None or (pos >= len(text) and not final):
            return ParseResult("")  # nothing yet, or a tag being generated
        if pos >= len(text) or text[pos] != "[":
            return ParseResult(text)
        scan = _Scan(text, pos)
        if scan.bad or (final and (scan.end < 0 or not self._only_end_after(text, scan.end))):
            return ParseResult(text)
        calls = [_call(text[a:b]) for a, b in scan.spans]
        if None in calls:
            return ParseResult(text)
        if not final and scan.end < 0:
            calls.append(ParsedToolCall(scan.partial, None))
        return ParseResult("", calls) if calls or not final else ParseResult(text)

    def _only_end_after(self, text: str, pos: int) -> bool:
        rest = text[pos:].strip()
        return not rest or (bool(self.END) and rest == self.END)


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


class Llama4PythonicParser(PythonicParser):
    name = "llama4_pythonic"
    START = ("<|python_start|>",)
    END = "<|python_end|>"
    needs_special_tokens = True


PYTHONIC_PARSERS = {"pythonic": PythonicParser, "llama4_pythonic": Llama4PythonicParser}
