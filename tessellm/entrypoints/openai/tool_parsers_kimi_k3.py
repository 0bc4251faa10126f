"""Kimi K3's XTML channels (``kimi_k3``): the reply in a ``response`` channel, the calls in a
``tools`` channel, both built of the special tokens ``<|open|>``, ``<|close|>`` and ``<|sep|>``::

    <|open|>response<|sep|>Let me check.<|close|>response<|sep|>
    <|open|>tools<|sep|>
      <|open|>call tool="get_weather" index="1"<|sep|>
        <|open|>argument key="city" type="string"<|sep|>Paris<|close|>argument<|sep|>
        <|open|>argument key="days" type="integer"<|sep|>3<|close|>argument<|sep|>
      <|close|>call<|sep|>
    <|close|>tools<|sep|>

An argument of ``type="string"`` is its text as written; of any other type strict JSON (text
that is not JSON stays text, as vLLM's). Attribute values are escaped (``&quot;``, ``&amp;``).
Content is the text outside the tools channel less the channel markers of ``response`` (whose
open marker is often the prompt's last tokens) and ``<|close|>message<|sep|>``.

Contract as in ``tool_parsers_base.py``; every search is bounded by the next marker, so a
parse is linear in the text.
"""

from __future__ import annotations

from typing import Optional

from tessellm.entrypoints.openai.tool_parsers_base import (ParsedToolCall, ParseResult, ToolParser, arguments_json,
                                                           decode_at, skip_ws, tagged_calls)
from tessellm.reasoning.holdback import held_back

SEP = "<|sep|>"


class KimiK3Parser(ToolParser):
    name = "kimi_k3"
    needs_special_tokens = True
    TOOLS, TOOLS_END = "<|open|>tools" + SEP, "<|close|>tools" + SEP
    CALL, CALL_END = "<|open|>call ", "<|close|>call" + SEP
    ARG, ARG_END = "<|open|>argument ", "<|close|>argument" + SEP
    CHANNEL_MARKERS = ("<|open|>response" + SEP, "<|close|>response" + SEP, "<|close|>message" + SEP)

    def parse(self, text: str, final: bool) -> ParseResult:
        tools = text.find(self.TOOLS)
        first = text.find(self.CALL, tools + len(self.TOOLS)) if tools >= 0 else -1
        if first < 0:
            if final:
                return ParseResult(self._content(text))
            cut = tools if tools >= 0 else len(text) - held_back(text, (self.TOOLS,) + self.CHANNEL_MARKERS)
            return ParseResult(self._content(text[:cut]))
        result = tagged_calls(text, tools, first, final, (self.CALL, self.CALL_END), self._call,
                              (self.TOOLS_END,) + self.CHANNEL_MARKERS)
        result.content = self._content(result.content)
        return result

    def _content(self, text: str) -> str:
        for marker in self.CHANNEL_MARKERS:
            text = text.replace(marker, "")
        return text

    def _call(self, body: str, whole: bool, _at: int) -> Optional[ParsedToolCall]:
        sep = body.find(SEP)
        name = _attributes(body[:sep]).get("tool") if sep >= 0 else None
        if not whole:
            return ParsedToolCall(name or None, None)
        args = self._arguments(body, sep + len(SEP)) if name else None
        return ParsedToolCall(name, args) if args is not None else None

    def _arguments(self, body: str, pos: int) -> Optional[str]:
        """The ``argument`` blocks from ``pos`` on as a JSON object; None if one is cut off or
        anything but whitespace lies around them."""
        args = {}
        while (a := body.find(self.ARG, pos)) >= 0:
            sep = body.find(SEP, a)
            end = body.find(self.ARG_END, sep) if sep >= 0 else -1
            if end < 0 or body[pos:a].strip():
                return None
            attrs = _attributes(body[a + len(self.ARG):sep])
            text = body[sep + len(SEP):end]
            if attrs.get("type", "string") == "string":
                args[attrs.get("key", "")] = text
            else:
                value, stop = decode_at(text, skip_ws(text, 0))
                args[attrs.get("key", "")] = value if stop >= 0 and not text[stop:].strip() else text
            pos = end + len(self.ARG_END)
        return arguments_json(args) if not body[pos:].strip() else None


def _attributes(text: str) -> dict[str, str]:
    """``key="value"`` pairs (values unescaped: ``&quot;`` then ``&amp;``) of a marker's head."""
    attrs, pos = {}, 0
    while (eq := text.find('="', pos)) >= 0:
        close = text.find('"', eq + 2)
        if close < 0:
            break
        key = text[pos:eq].split()[-1] if text[pos:eq].split() else ""
        attrs[key] = text[eq + 2:close].replace("&quot;", '"').replace("&amp;", "&")
        pos = close + 1
    return attrs


KIMI_K3_PARSERS = {"kimi_k3": KimiK3Parser}
