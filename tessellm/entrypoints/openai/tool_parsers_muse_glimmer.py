"""MuseGlimmer's ATEM tool calls (``muse_glimmer``, vLLM's parser of that name), read from its
recipient channels (``tessellm/reasoning/muse_glimmer.py`` frames them)::

    to=self<|message|>Look it up first.<|eom|>
    <|start|>assistant to=weather.get<|message|><atem:function_calls>
    <atem:invoke name="weather.get"><atem:parameter name="city">"Paris"</atem:parameter></atem:invoke>
    </atem:function_calls><|eom|>
    <|start|>assistant to=user<|message|>It is sunny.<|eot|>

The output is segmented into messages exactly as the reasoning parser does (same header and
end markers), then selected by recipient, as vLLM does (never subtracted, so a cut-off
``to=self`` block cannot swallow the call after it):

- a body to any recipient other than ``self`` / ``user`` is a tool channel: each complete
  ``<atem:invoke name="N">...</atem:invoke>`` in it is a call of ``N`` (``X.X`` read as ``X``
  when the request registers ``X`` and not ``X.X``: the shipped template's bare-name recipient),
  its ``<atem:parameter name="K">V</atem:parameter>`` the arguments, ``V`` JSON when it parses
  as strict JSON, else the string; an invoke never closed is dropped (vLLM: a truncated call is
  no call; the tool channel is never content);
- ``to=user`` and untagged (``<|message|>``) bodies are the content, joined;
- ``to=self`` bodies are neither (the ``muse_glimmer`` reasoning parser returns them as
  reasoning); text between messages is framing.

Text before the first header belongs to the channel the prompt left open (``opened``: the
reasoning plan sets it from the prompt's tail), untagged when none is. Streamed, a call appears
once its invoke is closed (its arguments whole); an open content body holds back a trailing
piece that could still be a marker or a header. ``tool_choice`` required / named are decoded
natively, no JSON grammar (``forced_natively``, vLLM's ``supports_required_and_named = False``):
the grammar would make the model write JSON inside its tool channel.

Contract as in ``tool_parsers_base.py``. Scans are ``str.find`` from a growing position and
bounded backward reads of each header (``messages``): linear, no regular expressions.
"""

from __future__ import annotations

import json
from typing import Optional

from tessellm.entrypoints.openai.tool_parsers_base import (MAX_CALLS, ParsedToolCall, ParseResult, ToolParser,
                                                           arguments_json)
from tessellm.reasoning.holdback import held_back
from tessellm.reasoning.muse_glimmer import EOM, EOT, MESSAGE, SELF, START, UNTAGGED, USER

MARKERS = (EOM, EOT, START, MESSAGE)
_NAME = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")

INVOKE, INVOKE_END = "<atem:invoke", "</atem:invoke>"
PARAM, PARAM_END = "<atem:parameter", "</atem:parameter>"


def _attr(tag: str, key: str = "name") -> Optional[str]:
    """``key="..."`` of an opening tag's text (up to its ``>``), or None."""
    at = tag.find(f' {key}="')
    if at < 0:
        return None
    start = at + len(key) + 3
    end = tag.find('"', start)
    return tag[start:end] if end > start else None


def _value(raw: str):
    """vLLM's ``x-parser: json`` with ``allow_non_json``: strict JSON, else the raw string."""
    def no_constant(name):
        raise ValueError(name)
    try:
        return json.loads(raw, parse_constant=no_constant)
    except (ValueError, RecursionError):
        return raw


def _starts_tag(text: str, at: int, tag: str) -> bool:
    nxt = text[at + len(tag):at + len(tag) + 1]
    return nxt in ("", ">", "/") or nxt.isspace()


def invokes(body: str) -> list[tuple[str, dict]]:
    """The complete ``(name, arguments)`` invokes of one tool-channel body, in order."""
    out, pos = [], 0
    while (at := body.find(INVOKE, pos)) >= 0:
        end = body.find(INVOKE_END, at)
        if end < 0:
            break  # still being written (or cut off): no call
        pos = end + len(INVOKE_END)
        if not _starts_tag(body, at, INVOKE):
            continue
        close = body.find(">", at, end)
        name = _attr(body[at:close]) if close >= 0 else None
        if not name:
            continue
        args, p = {}, close + 1
        while (q := body.find(PARAM, p, end)) >= 0:
            tag_end = body.find(">", q, end)
            stop = body.find(PARAM_END, tag_end, end) if tag_end >= 0 else -1
            if stop < 0:
                break
            key = _attr(body[q:tag_end])
            if key is not None and _starts_tag(body, q, PARAM):
                args[key] = _value(body[tag_end + 1:stop])
            p = stop + len(PARAM_END)
        out.append((name, args))
    return out


class _Next:
    """The next occurrence of each marker at or after a position that only grows (each search
    resumes where it stopped: a parse reads the text a few times, whatever it holds)."""

    def __init__(self, text: str):
        self.text, self.at = text, {m: -2 for m in MARKERS}

    def __call__(self, pos: int, markers=MARKERS) -> tuple[int, str]:
        best = (-1, "")
        for m in markers:
            if self.at[m] == -2 or 0 <= self.at[m] < pos:
                self.at[m] = self.text.find(m, pos)
            if self.at[m] >= 0 and (best[0] < 0 or self.at[m] < best[0]):
                best = (self.at[m], m)
        return best


def _header(text: str, lo: int, at: int) -> tuple[int, str]:
    """``(start, recipient)`` of the header whose ``<|message|>`` is at ``at`` (the reasoning
    parser's ``HEADER``, read backwards, not before ``lo``)."""
    p = at
    while p > lo and text[p - 1] in _NAME:
        p -= 1
    recipient = UNTAGGED
    if p < at and text.startswith("to=", p - 3) and p - 3 >= lo:
        recipient, p = text[p:at], p - 3
    elif p < at:
        p = at  # a name with no "to=": body text
    while p > lo and text[p - 1].isspace() and text[p - 1] != "\n":
        p -= 1
    q = p
    if text.startswith("assistant", q - 9) and q - 9 >= lo:
        q -= 9
        while q > lo and text[q - 1].isspace():
            q -= 1
        if text.startswith(START, q - len(START)) and q - len(START) >= lo:
            p = q - len(START)
    return p, recipient


def messages(text: str, opened: Optional[str] = None):
    """``(recipient, body, closed)`` of each message, as the reasoning parser frames them: a body
    ends at ``<|eom|>`` / ``<|eot|>`` (closed), at the next header or at ``<|start|>``; text
    before the first header is in ``opened`` (untagged when None); text between messages is
    framing. Linear."""
    nxt, pos = _Next(text), 0
    recipient = UNTAGGED if opened is None else opened
    while True:
        at, marker = nxt(pos)
        if at < 0:
            yield recipient, text[pos:], False
            return
        if marker == MESSAGE:
            (end, following), head = _header(text, pos, at), at
        else:  # an end marker or <|start|>: framing up to the next header
            end, (head, _) = at, nxt(at + len(marker), (MESSAGE,))
            following = _header(text, at + len(marker), head)[1] if head >= 0 else UNTAGGED
        yield recipient, text[pos:end], marker in (EOM, EOT)
        if head < 0:
            return
        recipient, pos = following, head + len(MESSAGE)


def _safe_tail(body: str) -> str:
    """``body`` less a trailing piece that could still become a marker or a header
    (`` to=us``, ``<|eo``)."""
    body = body[:len(body) - held_back(body, MARKERS)]
    p = len(body)
    while p > 0 and body[p - 1] in _NAME:
        p -= 1
    if body.startswith("to=", p - 3):
        p -= 3
    else:
        p = len(body) - (2 if body.endswith("to") else 1 if body.endswith("t") else 0)
    while p > 0 and body[p - 1].isspace() and body[p - 1] != "\n":
        p -= 1
    return body[:p]


class MuseGlimmerParser(ToolParser):
    name = "muse_glimmer"
    needs_special_tokens = True  # the channel framing is special tokens
    forced_natively = True  # required / named: no JSON grammar (ToolPlan)

    def __init__(self, tokenizer=None, tools=None):
        super().__init__(tokenizer, tools)
        self.opened: Optional[str] = None  # the channel the prompt left open (None: none)

    def parse(self, text: str, final: bool) -> ParseResult:
        content: list[str] = []
        calls: list[ParsedToolCall] = []
        for recipient, body, closed in messages(text, self.opened):
            if recipient in (USER, UNTAGGED):
                content.append(body if closed or final else _safe_tail(body))
            elif recipient != SELF:
                calls += [c for c in map(self._call, invokes(body)) if c is not None]
        return ParseResult("".join(content), calls[:MAX_CALLS])

    def _call(self, invoke: tuple[str, dict]) -> Optional[ParsedToolCall]:
        name, args = invoke
        arguments = arguments_json(args)
        return None if arguments is None else ParsedToolCall(self._registered(name), arguments)

    def _registered(self, name: str) -> str:
        """vLLM's ``_normalize_name``: ``X.X`` is ``X`` when only ``X`` is registered."""
        tools = getattr(self.request, "tools", None) or self.tools or []
        names = {t.function.name for t in tools}
        head, dot, tail = name.partition(".")
        return head if name not in names and dot and head == tail and head in names else name


MUSE_GLIMMER_PARSERS = {"muse_glimmer": MuseGlimmerParser}
