"""What every tool-call parser shares: the result types, the base class, and the scans they
are built from (JSON values at a position, a call object's name while it is still being
written, typed parameter values from the request's tool schema).

The contract (``tool_parsers.py`` lists the parsers): ``parse(text, final)`` is called with the
whole text so far, so a stream and a whole response go through the same code and reassemble to
the same calls. While not ``final``, ``content`` is only text that can no longer turn into a
tool call (a possible start of a marker is held back) and a call whose arguments are not
complete has ``arguments`` None (its name once known). When ``final`` and a call does not
parse, the whole text is content (no calls). Text outside the calls is content: before the
first, and between and after them when it is more than whitespace (``next_call``).

Arguments are strict JSON (RFC 8259): a call whose arguments hold ``NaN``, ``Infinity`` or
``-Infinity`` (which Python's ``json`` reads and writes, and a client's ``JSON.parse`` refuses)
is not a call, so once final its text is content like any other malformed call.

Safety: ``str.find``, ``json`` decoding, ``ast`` parsing of literals (never ``eval``) and scans
that look at each character a bounded number of times: linear in the text, no regular
expressions; at most ``MAX_CALLS`` calls per output.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from tessellm.reasoning.holdback import held_back



def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_not_json)  # strict: NaN / Infinity are not values
_WS = " \t\r\n"
MAX_CALLS = 64  # more calls in one output: it is not a tool call (bounds the work per parse)


@dataclass
class ParsedToolCall:
    name: Optional[str]  # None while not yet generated
    arguments: Optional[str]  # JSON text; None while the call is incomplete
    id: Optional[str] = None  # the call's id when the model writes one (Kimi-K2), else made up


@dataclass
class ParseResult:
    content: str
    calls: list[ParsedToolCall] = field(default_factory=list)


class ToolParser:
    """The base of every tool-call parser.

    tessellm's parsers implement ``parse(text, final)``. A parser written for vLLM (a
    ``--tool-parser-plugin`` file) implements ``extract_tool_calls(model_output, request)``
    instead; the base's ``parse`` runs it on the whole text once the output is final
    (``tool_parsers_vllm.py``), and the base's ``extract_tool_calls`` runs ``parse`` for callers
    that use vLLM's method on a built-in parser. ``request`` is the chat request being answered
    (its ``tools`` type the parameters of the XML formats); the server sets it per request."""

    name = ""
    needs_special_tokens = False  # its markers are special tokens: keep them in the text
    partial_arguments = False  # arguments grow while streaming (else they come complete)
    keeps_state = False  # parse keeps its stream's state across calls: one instance per choice

    def __init__(self, tokenizer=None, tools=None):
        self.model_tokenizer = tokenizer
        self.tools = tools  # the request's tools (newer vLLM passes them to the constructor)
        self.request = None  # the ChatCompletionRequest (None: no tool schemas known)
        # vLLM's ToolParser attributes, which plugin parsers read and write
        self.prev_tool_call_arr: list[dict] = []
        self.current_tool_id = -1
        self.current_tool_name_sent = False
        self.streamed_args_for_tool: list[str] = []

    @property
    def vocab(self) -> dict[str, int]:
        return self.model_tokenizer.get_vocab() if self.model_tokenizer is not None else {}

    def adjust_request(self, request):
        """vLLM's hook: change the request before it is sampled (e.g. ``skip_special_tokens``)."""
        return request

    def parse(self, text: str, final: bool) -> ParseResult:
        from tessellm.entrypoints.openai.tool_parsers_vllm import parse_with_extract

        return parse_with_extract(self, text, final)

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids, current_token_ids, delta_token_ids, request):
        """vLLM's streaming method: a plugin parser that implements it is called once per delta
        (``tool_parsers_vllm.PluginStream``); the built-in parsers stream through ``parse``."""
        raise NotImplementedError(f"{type(self).__name__} streams through parse(text, final).")

    def extract_tool_calls(self, model_output: str, request):
        from tessellm.entrypoints.openai.tool_parsers_vllm import extract_with_parse

        return extract_with_parse(self, model_output, request)

    def parameter_schemas(self, function: str) -> dict:
        """``properties`` of ``function``'s parameters in the request's tools ({} if unknown)."""
        for tool in getattr(self.request, "tools", None) or self.tools or []:
            if tool.function.name == function and isinstance(tool.function.parameters, dict):
                props = tool.function.parameters.get("properties")
                return props if isinstance(props, dict) else {}
        return {}


def call_from_object(obj, args_keys=("arguments", "parameters")) -> Optional[ParsedToolCall]:
    """``{"name": ..., "arguments"|"parameters": {...}}`` as a call; None if not that shape."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):
        return ParsedToolCall(obj["name"], args) if strict_json(args) else None
    if not isinstance(args, dict):
        return None
    text = arguments_json(args)
    return ParsedToolCall(obj["name"], text) if text is not None else None


def arguments_json(args: dict) -> Optional[str]:
    """``args`` as strict JSON text; None where the encoder cannot write it (a NaN or an
    infinity; nested deeper than the interpreter's recursion limit allows from the caller's
    stack): not a call, never a 500."""
    try:
        return json.dumps(args, ensure_ascii=False, allow_nan=False)
    except (RecursionError, ValueError):
        return None


def strict_json(text) -> bool:
    """Whether ``text`` is a string of strict JSON (no NaN / Infinity)."""
    try:
        _DECODER.decode(text)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def decode_at(text: str, pos: int):
    """``(value, end)`` of the JSON value at ``pos``, or ``(None, -1)`` if it is incomplete or
    invalid there."""
    try:
        return _DECODER.raw_decode(text, pos)
    except (json.JSONDecodeError, RecursionError, ValueError):
        return None, -1


def json_object_at(text: str, pos: int) -> Optional[str]:
    """The JSON object at ``pos`` (after whitespace) as compact-or-original text, if it is a
    whole object and only whitespace follows it; else None."""
    pos = skip_ws(text, pos)
    value, end = decode_at(text, pos)
    if end < 0 or not isinstance(value, dict) or text[end:].strip():
        return None
    return text[pos:end]


def partial_name(text: str) -> Optional[str]:
    """The value of ``"name": "..."`` in an incomplete JSON object, once its string closed
    (None for ``""``: no call has an empty name, so none is announced while streaming)."""
    key = text.find('"name"')
    if key < 0:
        return None
    i = skip_ws(text, key + 6)
    if i >= len(text) or text[i] != ":":
        return None
    i = skip_ws(text, i + 1)
    if i >= len(text) or text[i] != '"':
        return None
    value, end = decode_at(text, i)
    return value if isinstance(value, str) and value and end > 0 else None


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def take_call(text: str, pos: int, final: bool, calls: list[ParsedToolCall]):
    """The JSON call object at ``pos`` appended to ``calls``: its end; None while streaming an
    unfinished one (appended as a call whose name is known so far: stop there); or the whole
    parse's result where it ends here (final and not a call: the text is content; more than
    ``MAX_CALLS`` calls)."""
    value, end = decode_at(text, pos)
    call = call_from_object(value) if end > 0 else None
    if call is None:
        if final:
            return ParseResult(text)
        calls.append(ParsedToolCall(partial_name(text[pos:]), None))
        return None
    calls.append(call)
    if len(calls) > MAX_CALLS:
        return ParseResult(text if final else "")
    return end


def call_sequence(text: str, pos: int, final: bool, sep: str,
                  stop: Optional[str] = None) -> ParseResult:
    """JSON call objects from ``pos`` on, each optionally followed by ``sep``, until ``stop`` or
    the text's end. While streaming, an unfinished object is a call whose name is known so far;
    once final, anything that is not a call makes the whole text content again."""
    return call_list(text, pos, final, sep, stop)[0]


def call_list(text: str, pos: int, final: bool, sep: str, stop: Optional[str] = None) -> tuple[ParseResult, int]:
    """``call_sequence``'s result and where it stopped (at ``stop``, or the text's end)."""
    calls = []
    while pos < len(text) and text[pos] != stop:
        end = take_call(text, pos, final, calls)
        if isinstance(end, ParseResult):
            return end, len(text)
        if end is None:
            return ParseResult("", calls), len(text)
        pos = skip_ws(text, end)
        if pos < len(text) and text[pos] == sep:
            pos = skip_ws(text, pos + 1)
    return ParseResult("", calls), pos


def first_of(text: str, markers: tuple[str, ...], pos: int = 0) -> int:
    """Where the first of ``markers`` occurs in ``text`` from ``pos`` on (-1: none does)."""
    found = [i for i in (text.find(m, pos) for m in markers) if i >= 0]
    return min(found) if found else -1


def next_call(text: str, pos: int, final: bool, starts: tuple[str, ...],
              closes: tuple[str, ...] = ()) -> tuple[int, str]:
    """After a call that ends at ``pos`` (and any of ``closes``, its wrappers' end tags, that
    follow it): where the next call starts (the first of ``starts``; -1: none, or none yet),
    and the content in between: the text up to it (or, with no next call, to the end; while
    streaming less a possible start of a marker at the end) when it is more than whitespace,
    else ``""``. Every parser built on it keeps all text outside its calls as content."""
    after, p = pos, skip_ws(text, pos)
    while (close := next((c for c in closes if text.startswith(c, p)), None)) is not None:
        after = p + len(close)
        p = skip_ws(text, after)
    nxt = first_of(text, starts, after) if starts else -1
    if nxt >= 0:
        gap = text[after:nxt]
    else:
        gap = text[after:]
        gap = gap if final or not starts + closes else gap[:len(gap) - held_back(gap, starts + closes)]
    return nxt, gap if gap.strip() else ""


def tagged_calls(text: str, start: int, pos: int, final: bool, tags: tuple[str, str], read,
                 closes: tuple[str, ...] = ()) -> ParseResult:
    """Calls each written between ``tags`` (its open and close tag), the first opening at
    ``pos``; the content is ``text[:start]`` and the text outside the calls (``next_call``).
    ``read(body, whole, at)`` reads one call's body (opened at ``at``): once ``whole`` (closed,
    or the output final) a call or None (not a call: all of the text is content); before, a
    call whose arguments may still be None (its name once known)."""
    open_tag, close_tag = tags
    calls, gaps = [], []
    while pos >= 0:
        end = text.find(close_tag, pos + len(open_tag))
        call = read(text[pos + len(open_tag):end if end >= 0 else len(text)], end >= 0 or final, pos)
        if call is None:
            return ParseResult(text)
        calls.append(call)
        if len(calls) > MAX_CALLS:
            return ParseResult(text if final else "")
        if end < 0:
            break
        pos, gap = next_call(text, end + len(close_tag), final, (open_tag,), closes)
        gaps.append(gap)
    return ParseResult(text[:start] + "".join(gaps), calls)


def after_tag(text: str, pos: int, tags: tuple[str, ...], final: bool) -> Optional[int]:
    """Past one of ``tags`` at ``pos`` (and the whitespace after it); ``pos`` if none is there;
    None while the text so far could still be the start of one (hold it back)."""
    for tag in tags:
        if text.startswith(tag, pos):
            return skip_ws(text, pos + len(tag))
    if not final and pos < len(text) and any(t.startswith(text[pos:]) for t in tags):
        return None
    return pos


# -- parameter values typed by the request's schema (the XML formats write them as text) -----

_STRINGS = ("string", "str", "text", "varchar", "char", "enum")
_INTS = ("int", "uint", "long", "short", "unsigned")


def schema_type(schema) -> str:
    """The declared type of a parameter schema, lower case ("string" when none is given); of
    ``["integer", "null"]`` or ``anyOf``/``oneOf`` alternatives the first that is not null."""
    if not isinstance(schema, dict):
        return "string"
    kind = schema.get("type")
    options = schema.get("anyOf") or schema.get("oneOf")
    if kind is None and isinstance(options, list):
        kind = next((schema_type(o) for o in options if isinstance(o, dict) and o.get("type") != "null"), None)
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    return str(kind).strip().lower() if kind is not None else "string"


def typed_value(text: str, schema) -> Any:
    """A parameter's text as its schema's type (vLLM's qwen3_coder rules): ``null`` is None;
    integers and numbers parse (a number with no fraction becomes an int), booleans are
    ``true``/``false``, objects and arrays are JSON (or a Python literal); anything that does
    not convert stays the string it was. No schema: the string."""
    if text.lower() == "null":
        return None
    if schema is None:
        return text
    kind = schema_type(schema)
    if kind in _STRINGS:
        return text
    if kind.startswith(_INTS):
        try:
            return int(text)
        except ValueError:
            return text
    if kind.startswith(("num", "float")):
        try:
            number = float(text)
        except ValueError:
            return text
        if not math.isfinite(number):
            return text
        return int(number) if number.is_integer() else number
    if kind in ("boolean", "bool", "binary"):
        return text.lower() == "true"
    return loose_literal(text)


def loose_literal(text: str) -> Any:
    """``text`` as JSON, else as a Python literal (``ast.literal_eval``: literals only, never
    code), else the string itself; a value JSON cannot carry (NaN, a set, bytes) stays text."""
    for read in (_DECODER.decode, ast.literal_eval):
        try:
            value = read(text)
            json.dumps(value, allow_nan=False)
            return value
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            pass
    return text
