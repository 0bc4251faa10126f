"""Tool calls written as a Python list of calls with keyword arguments (Llama 3.2, Llama 4,
ToolACE)::

    [get_weather(city="Paris", unit="celsius"), get_time(tz='CET')]

``pythonic``: the output is that list; ``llama4_pythonic``: also inside Llama 4's
``<|python_start|>`` ... ``<|python_end|>``; ``olmo3``: one call per line (no brackets) inside
``<function_calls>`` ... ``</function_calls>``; ``lfm2``: the list between LFM2's
``<|tool_call_start|>`` and ``<|tool_call_end|>``, text before and after it content. Argument
values are Python literals (strings, numbers, True/False/None, lists, tuples and dicts of
them): each call is parsed with ``ast`` and its values read with ``ast.literal_eval``; nothing
is ever evaluated. An output that is not such a list is content.

One linear scan splits the list into its calls (brackets and string literals tracked), so each
call is parsed once it is complete; while streaming, the call being written has its name as
soon as its ``(`` is generated. The scan is a per-character Python loop, so a stream resumes
it where the previous, shorter text stopped (``_Scan.extend``) and parses each complete call
once: a streamed output costs about what one whole parse does, not a scan per delta.
"""

from __future__ import annotations

import ast
import json
from typing import Optional

from tessellm.entrypoints.openai.tool_parsers_base import (MAX_CALLS, ParsedToolCall, ParseResult, ToolParser,
                                                           after_tag, next_call)
from tessellm.reasoning.holdback import hold_back

_OPEN, _CLOSE = "([{", ")]}"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")


_JSON_NAMES = {"null": None, "true": True, "false": False}


class _JsonNames(ast.NodeTransformer):
    """``null``/``true``/``false`` written as Python names: their constants (Olmo 3 writes them)."""

    def visit_Name(self, node: ast.Name):
        return ast.copy_location(ast.Constant(_JSON_NAMES[node.id]), node) if node.id in _JSON_NAMES else node


def _call(segment: str, json_names: bool = False) -> Optional[ParsedToolCall]:
    """``name(key=literal, ...)`` as a call; None if it is anything else."""
    try:
        node = ast.parse(segment.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, ast.Name):
            return None
        if any(k.arg is None for k in node.keywords):  # **kwargs
            return None
        values = [_JsonNames().visit(k.value) if json_names else k.value for k in node.keywords]
        args = {k.arg: ast.literal_eval(v) for k, v in zip(node.keywords, values)}
        return ParsedToolCall(node.func.id, json.dumps(args, ensure_ascii=False, allow_nan=False))
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


class _Scan:
    """The calls from ``text[pos]`` on (``call, call, ...`` or one per line) up to ``close``
    (the ``]`` of a list, the ``<`` of a closing tag): their spans, the name of an unfinished
    one, where they end, and whether the text stopped being calls."""

    def __init__(self, text: str, pos: int, close: str = "]"):
        self.spans: list[tuple[int, int]] = []  # complete calls: text[a:b]
        self.partial: Optional[str] = None  # the call being written: its name once "(" came
        self.end = -1  # after the closing "]" / at the "<" (-1: not generated yet)
        self.bad = False  # not a list of calls
        self.pending = False  # the text ends inside a call (or its name)
        self.close = close
        self.pos = pos
        self.text = ""  # the text scanned so far
        self._state = (pos, 0, "", -1)  # where the scan stopped: index, depth, quote, call start
        self._calls: list[Optional[ParsedToolCall]] = []  # the first spans, parsed
        self.extend(text)

    def resumes(self, text: str, pos: int, close: str) -> bool:
        """Whether ``text`` (from ``pos``, up to ``close``) extends the text scanned so far."""
        return self.pos == pos and self.close == close and text.startswith(self.text)

    def extend(self, text: str) -> "_Scan":
        """Scan on through ``text``, which extends the text scanned so far."""
        self.text = text
        if self.end < 0 and not self.bad:
            self._run(text, *self._state)
        return self

    def calls(self, json_names: bool = False) -> list[Optional[ParsedToolCall]]:
        """The complete calls (None for one that is not a literal-only call), each parsed once."""
        for a, b in self.spans[len(self._calls):]:
            self._calls.append(_call(self.text[a:b], json_names))
        return self._calls

    def _run(self, text: str, i: int, depth: int, quote: str, start: int) -> None:
        """From ``text[i]`` on; ``depth`` of brackets inside the current call, the open
        ``quote``, the current call's ``start`` (-1: between calls)."""
        self.pending = False
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
                elif c == self.close and start < 0:
                    self.end = i + (c == "]")
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
        self._state = (i, depth, quote, start)
        self.pending = start >= 0


class PythonicParser(ToolParser):
    name = "pythonic"
    START: tuple[str, ...] = ()  # tags the list may come after
    END = ""  # a tag the list may be followed by
    SCANS_KEPT = 8  # recent scans resumed (one per streamed choice of the request)

    def __init__(self, tokenizer=None, tools=None):
        super().__init__(tokenizer, tools)
        self._scans: list[_Scan] = []  # the latest first

    def _scan(self, text: str, pos: int, close: str = "]") -> _Scan:
        """The scan of ``text``: a kept one resumed where ``text`` extends its text, else new."""
        scans = self._scans
        for scan in scans:
            if scan.resumes(text, pos, close):
                scans.remove(scan)
                break
        else:
            scan = _Scan(text, pos, close)
        scans.insert(0, scan.extend(text))
        del scans[self.SCANS_KEPT:]
        return scan

    def parse(self, text: str, final: bool) -> ParseResult:
        pos = after_tag(text, _skip(text, 0), self.START, final)
        if pos is None or (pos >= len(text) and not final):
            return ParseResult("")  # nothing yet, or a tag being generated
        if pos >= len(text) or text[pos] != "[":
            return ParseResult(text)
        scan = self._scan(text, pos + 1)
        if scan.bad or (final and (scan.end < 0 or not self._only_end_after(text, scan.end))):
            return ParseResult(text)
        calls = list(scan.calls())
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


class Olmo3Parser(PythonicParser):
    """Olmo 3: one call per line inside ``<function_calls>`` ... ``</function_calls>``; values
    may also be ``null``/``true``/``false``."""

    name = "olmo3"
    TAG, END = "<function_calls>", "</function_calls>"

    def parse(self, text: str, final: bool) -> ParseResult:
        pos = after_tag(text, _skip(text, 0), (self.TAG,), final)
        if pos is None or (pos >= len(text) and not final):
            return ParseResult("")
        if pos == _skip(text, 0):  # no tag: text (as vLLM streams it)
            return ParseResult(text)
        scan = self._scan(text, pos, close="<")
        end = scan.end if scan.end >= 0 else len(text)
        if scan.bad or (final and (scan.pending or not self._only_end_after(text, end))):
            return ParseResult(text)
        calls = list(scan.calls(json_names=True))
        if None in calls or (final and not calls):
            return ParseResult(text)
        if scan.pending:
            calls.append(ParsedToolCall(scan.partial, None))
        return ParseResult("", calls)


class Lfm2Parser(PythonicParser):
    """LFM2 / LFM2.5: the call list between ``<|tool_call_start|>`` and ``<|tool_call_end|>``;
    text before and after it is content, less the model's echo of the call: after the block's
    end token, text that opens (after whitespace) with ``[`` or ``<`` runs through the next
    ``<|tool_call_end|>`` and is dropped with it, as often as it recurs (vLLM drops the text
    through the last such orphan end token). While streaming, such text is held back until its
    end token comes; an output that ends first keeps it as content."""

    name = "lfm2"
    TAG, END = "<|tool_call_start|>", "<|tool_call_end|>"
    needs_special_tokens = True

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(self.TAG)
        if start < 0:
            return ParseResult(text if final else hold_back(text, self.TAG))
        pos = _skip(text, start + len(self.TAG))
        if pos >= len(text) or text[pos] != "[":
            return ParseResult(text if final or pos < len(text) else text[:start])
        scan = self._scan(text, pos + 1)
        calls = list(scan.calls())
        if scan.bad or None in calls or (final and scan.end < 0) or (scan.end >= 0 and not calls):
            return ParseResult(text)  # not a call list (an empty one neither): all of it content
        if scan.end < 0:
            return ParseResult(text[:start], calls + [ParsedToolCall(scan.partial, None)])
        return ParseResult(text[:start] + self._after(text, scan.end, final), calls)

    def _after(self, text: str, pos: int, final: bool) -> str:
        """The content after the call list that ends at ``pos``: with its end token right
        after it, past the echoes that follow (each through its own end token)."""
        p = _skip(text, pos)
        if not text.startswith(self.END, p):
            return next_call(text, pos, final, (), (self.END,))[1]
        pos = p + len(self.END)
        while (p := _skip(text, pos)) < len(text) and text[p] in "[<":
            end = text.find(self.END, p)
            if end < 0:
                if not final:
                    return ""  # maybe an echo: held back until its end token
                break
            pos = end + len(self.END)
        return next_call(text, pos, final, (), ())[1]


PYTHONIC_PARSERS = {"pythonic": PythonicParser, "llama4_pythonic": Llama4PythonicParser, "olmo3": Olmo3Parser,
                    "lfm2": Lfm2Parser}
