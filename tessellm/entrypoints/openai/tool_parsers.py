"""Tool-call parsers: a model's text output -> (content, tool calls), complete or partial.

``--tool-call-parser`` picks one for ``tool_choice: "auto"``: ``hermes`` (Hermes / Qwen
``<tool_call>{json}</tool_call>``), ``llama3_json`` (Llama 3.x ``{"name", "parameters"}``
objects, optionally after ``<|python_tag|>``, separated by ``;``) and ``mistral``
(``[TOOL_CALLS]`` then a JSON array, or ``name[ARGS]{json}`` pieces). Two more serve forced
choices: ``RequiredParser`` (the JSON array that ``tool_choice: "required"`` constrains the
output to) and ``NamedParser`` (the output *is* the arguments of the named function).

``parse(text, final)`` is called with the whole text so far, so a stream and a whole response
go through the same code and reassemble to the same calls. While not ``final``: ``content`` is
only text that can no longer turn into a tool call (a possible start of a marker is held
back), and a call whose JSON is not complete yet has ``arguments`` None (its name once known).
When ``final`` and a call does not parse, the whole text is content (no calls).

Safety: only ``str.find``, ``json`` decoding and scans that look at each character a bounded
number of times: linear in the text, no regular expressions, no ``eval``; at most
``MAX_CALLS`` calls per output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from tessellm.reasoning.holdback import hold_back

_DECODER = json.JSONDecoder()
_WS = " \t\r\n"
MAX_CALLS = 64  # more calls in one output: it is not a tool call (bounds the work per parse)


@dataclass
class ParsedToolCall:
    name: Optional[str]  # None while not yet generated
    arguments: Optional[str]  # JSON text; None while the call is incomplete


@dataclass
class ParseResult:
    content: str
    calls: list[ParsedToolCall] = field(default_factory=list)


class ToolParser:
    name = ""
    needs_special_tokens = False  # its markers are special tokens: keep them in the text
    partial_arguments = False  # arguments grow while streaming (else they come complete)

    def parse(self, text: str, final: bool) -> ParseResult:
        raise NotImplementedError


def call_from_object(obj, args_keys=("arguments", "parameters")) -> Optional[ParsedToolCall]:
    """``{"name": ..., "arguments"|"parameters": {...}}`` as a call; None if not that shape."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):
        try:
            json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            return None
        return ParsedToolCall(obj["name"], args)
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def decode_at(text: str, pos: int):
    """``(value, end)`` of the JSON value at ``pos``, or ``(None, -1)`` if it is incomplete or
    invalid there."""
    try:
        return _DECODER.raw_decode(text, pos)
    except (json.JSONDecodeError, RecursionError, ValueError):
        return None, -1


def partial_name(text: str) -> Optional[str]:
    """The value of ``"name": "..."`` in an incomplete JSON object, once its string closed."""
    key = text.find('"name"')
    if key < 0:
        return None
    i = key + 6
    while i < len(text) and text[i] in _WS:
        i += 1
    if i >= len(text) or text[i] != ":":
        return None
    i += 1
    while i < len(text) and text[i] in _WS:
        i += 1
    if i >= len(text) or text[i] != '"':
        return None
    value, end = decode_at(text, i)
    return value if isinstance(value, str) and end > 0 else None


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


class HermesParser(ToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(self.START)
        if start < 0:
            return ParseResult(text if final else hold_back(text, self.START))
        calls, pos = [], start
        while pos >= 0:
            body_start = pos + len(self.START)
            end = text.find(self.END, body_start)
            body = text[body_start:end if end >= 0 else len(text)]
            value, stop = decode_at(body, skip_ws(body, 0))
            call = call_from_object(value) if stop > 0 and not body[stop:].strip() else None
            if call is None:
                if final:
                    return ParseResult(text)
                calls.append(ParsedToolCall(partial_name(body), None))
                break
            calls.append(call)
            if len(calls) > MAX_CALLS:
                return ParseResult(text if final else "")
            pos = text.find(self.START, end + len(self.END)) if end >= 0 else -1
        return ParseResult(text[:start], calls)


def _call_sequence(text: str, pos: int, final: bool, sep: str,
                   stop: Optional[str] = None) -> ParseResult:
    """JSON call objects from ``pos`` on, each optionally followed by ``sep``, until ``stop`` or
    the text's end. While streaming, an unfinished object is a call whose name is known so far;
    once final, anything that is not a call makes the whole text content again."""
    calls = []
    while pos < len(text) and text[pos] != stop:
        value, end = decode_at(text, pos)
        call = call_from_object(value) if end > 0 else None
        if call is None:
            if final:
                return ParseResult(text)
            calls.append(ParsedToolCall(partial_name(text[pos:]), None))
            break
        calls.append(call)
        if len(calls) > MAX_CALLS:
            return ParseResult(text if final else "")
        pos = skip_ws(text, end)
        if pos < len(text) and text[pos] == sep:
            pos = skip_ws(text, pos + 1)
    return ParseResult("", calls)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> ParseResult:
        pos = skip_ws(text, 0)
        if text.startswith(self.TAG, pos):
            pos = skip_ws(text, pos + len(self.TAG))
        elif not final and self.TAG.startswith(text[pos:]):
            return ParseResult("")  # nothing yet, or the tag is being generated
        if pos >= len(text):
            return ParseResult(text if final else "")
        if text[pos] != "{":
            return ParseResult(text)
        return _call_sequence(text, pos, final, sep=";")


class MistralParser(ToolParser):
    name = "mistral"
    START, ARGS = "[TOOL_CALLS]", "[ARGS]"
    needs_special_tokens = True

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(self.START)
        if start < 0:
            return ParseResult(text if final else hold_back(text, self.START))
        pos = skip_ws(text, start + len(self.START))
        calls = self._array(text, pos, final) if text.startswith("[", pos) and not text.startswith(
            self.ARGS, pos) else self._pieces(text, pos, final)
        if calls is None:
            return ParseResult(text)
        return ParseResult(text[:start], calls)

    def _array(self, text: str, pos: int, final: bool) -> Optional[list[ParsedToolCall]]:
        value, end = decode_at(text, pos)
        if end < 0:
            return None if final else [ParsedToolCall(partial_name(text[pos:]), None)]
        calls = [call_from_object(v) for v in value[:MAX_CALLS + 1]] if isinstance(value, list) else [None]
        if len(calls) > MAX_CALLS:
            return None
        return None if not calls or None in calls else calls

    def _pieces(self, text: str, pos: int, final: bool) -> Optional[list[ParsedToolCall]]:
        """``name[ARGS]{json}`` pieces, each optionally after another ``[TOOL_CALLS]``."""
        calls = []
        while pos < len(text):
            if text.startswith(self.START, pos):
                pos = skip_ws(text, pos + len(self.START))
                continue
            args = text.find(self.ARGS, pos)
            if args < 0:
                return None if final else calls + [ParsedToolCall(None, None)]
            name = text[pos:args].strip()
            value, end = decode_at(text, skip_ws(text, args + len(self.ARGS)))
            if end < 0 or not isinstance(value, dict) or not name:
                return None if final else calls + [ParsedToolCall(name or None, None)]
            calls.append(ParsedToolCall(name, json.dumps(value, ensure_ascii=False)))
            if len(calls) > MAX_CALLS:
                return None
            pos = skip_ws(text, end)
        return calls or (None if final else [])


class RequiredParser(ToolParser):
    """``tool_choice: "required"``: a JSON array of ``{"name", "parameters"}`` (constrained)."""

    name = "required"

    def parse(self, text: str, final: bool) -> ParseResult:
        pos = skip_ws(text, 0)
        if pos < len(text) and text[pos] != "[":
            return ParseResult(text)
        return _call_sequence(text, skip_ws(text, pos + 1), final, sep=",", stop="]")


class NamedParser(ToolParser):
    """A named ``tool_choice``: the whole output is that function's arguments."""

    name = "named"
    partial_arguments = True

    def __init__(self, function_name: str):
        self.function_name = function_name

    def parse(self, text: str, final: bool) -> ParseResult:
        return ParseResult("", [ParsedToolCall(self.function_name, text)])


class HarmonyToolParser(ToolParser):
    """gpt-oss's harmony format (``tessellm/reasoning/harmony.py``): calls are messages to
    ``functions.NAME`` (arguments streamed as written), content the final channel; the
    analysis channel lands in ``reasoning`` (read after each ``parse``). ``forced``: the
    parser of a forced tool_choice (required / named), whose constraint applies to the final
    channel (the grammar starts after ``<|channel|>final<|message|>``): its calls come from
    that channel's text."""

    name = "openai"
    needs_special_tokens = True
    partial_arguments = True

    def __init__(self, calls: bool = True, forced: Optional[ToolParser] = None, opened: Optional[tuple] = None):
        from tessellm.reasoning.harmony import HarmonyParser

        self.harmony = HarmonyParser(opened)  # opened: the header the prompt ended with
        self.calls = calls
        self.forced = forced
        self.reasoning: Optional[str] = None  # of the last parse; None: the output has none

    def parse(self, text: str, final: bool) -> ParseResult:
        from tessellm.reasoning.harmony import join, to_openai

        out = to_openai(self.harmony.parse(text, final), self.calls, split_final=self.forced is not None)
        self.reasoning = join(out.reasoning) if out.reasoning else None
        calls = [ParsedToolCall(name, args or ("{}" if final else "")) for name, args in out.calls]
        content = join(out.content)
        if out.final:  # a forced tool_choice: its calls are the final channel's text
            forced = self.forced.parse(join(out.final), final)
            content, calls = join([content, forced.content]), calls + forced.calls
        return ParseResult(content, calls[:MAX_CALLS])


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser, "qwen": HermesParser, "llama3_json": Llama3JsonParser,
    "mistral": MistralParser, "openai": HarmonyToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"Unknown tool-call parser {name!r}; choose one of {', '.join(sorted(TOOL_PARSERS))}.")
    return TOOL_PARSERS[name]()
