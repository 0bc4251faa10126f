"""Tool-call formats that write calls as JSON ``{"name": ..., "arguments"|"parameters": {...}}``
objects, in an array or one after another, after a marker; content is the text before it.

| parser | model output |
|---|---|
| ``granite-20b-fc`` | ``<function_call>{...}`` once per call (granite-20b-functioncalling) |
| ``granite`` | ``[{...}, ...]``, optionally after ``<|tool_call|>`` (Granite 3.0) or ``<tool_call>`` (3.1+) |
| ``xlam`` | ``[{...}, ...]`` alone, or in a ```` ```json ```` block, after ``[TOOL_CALLS]`` or in ``<tool_call>`` tags |
| ``phi4_mini_json`` | ``functools[{...}, ...]`` |
| ``internlm`` | ``<|action_start|><|plugin|>{...}<|action_end|>`` (InternLM 2 / 2.5, one call) |
| ``jamba`` | ``<tool_calls>[{...}, ...]</tool_calls>`` |
| ``hunyuan_a13b`` | ``<tool_calls>[{...}, ...]</tool_calls>`` |
| ``minimax`` | ``<tool_calls>`` then one ``{...}`` per line, then ``</tool_calls>`` (MiniMax-M1) |
| ``apertus`` | ``<|tools_prefix|>[{"NAME": {...}}, ...]<|tools_suffix|>`` (Apertus; one key per call object) |

Contract as in ``tool_parsers_base.py``; a call's arguments come whole once its object is. Text
after the list (and its closing tag) is content, after the text before it: vLLM's granite
refuses such an output (all of it content), its xlam, jamba and hunyuan parsers drop the text.
"""

from __future__ import annotations

from typing import Optional

from tessellm.entrypoints.openai.tool_parsers_base import (MAX_CALLS, ParsedToolCall, ParseResult, ToolParser,
                                                           after_tag, arguments_json, call_list, decode_at, next_call,
                                                           skip_ws, take_call)
from tessellm.reasoning.holdback import held_back


def calls_at(text: str, start: int, pos: int, final: bool, closes: tuple[str, ...] = ()) -> ParseResult:
    """The calls written from ``pos`` on (a JSON array of call objects, or call objects one
    after another, up to a ``<`` tag) as the calls of ``text``, whose content is
    ``text[:start]`` and the text after the list (and after one of ``closes``, the list's
    closing tag); when final and they are not calls, all of ``text`` is content."""
    pos = skip_ws(text, pos)
    if pos >= len(text):
        return ParseResult(text if final else text[:start])
    if text[pos] == "[":
        result, end = call_list(text, skip_ws(text, pos + 1), final, sep=",", stop="]")
        end += end < len(text)  # past the "]"
    elif text[pos] == "{":
        result, end = call_list(text, pos, final, sep=",", stop="<")
    else:
        return ParseResult(text)
    if result.content or (final and not result.calls):
        return ParseResult(text if final else "")
    tail = next_call(text, end, final, (), closes)[1] if end < len(text) else ""
    return ParseResult(text[:start] + tail, result.calls)


class _AfterMarker(ToolParser):
    """Calls after the first of ``MARKERS``; the text before it is content."""

    MARKERS: tuple[str, ...] = ()
    CLOSES: tuple[str, ...] = ()  # the list's closing tag (text after it is content)

    def parse(self, text: str, final: bool) -> ParseResult:
        found = [(i, m) for m in self.MARKERS if (i := text.find(m)) >= 0]
        if not found:
            return ParseResult(text if final else text[:len(text) - held_back(text, self.MARKERS)])
        start, marker = min(found)
        pos = self.body(text, start, marker, final)
        return ParseResult(text[:start]) if pos is None else calls_at(text, start, pos, final, self.CLOSES)

    def body(self, text: str, start: int, marker: str, final: bool) -> Optional[int]:
        """Where the calls after ``marker`` begin; None: not known yet."""
        return start + len(marker)


class GraniteParser(ToolParser):
    name = "granite"
    TAGS = ("<|tool_call|>", "<tool_call>")

    def parse(self, text: str, final: bool) -> ParseResult:
        pos = after_tag(text, skip_ws(text, 0), self.TAGS, final)
        if pos is None or (pos >= len(text) and not final):
            return ParseResult("")
        if pos >= len(text) or text[pos] != "[":
            return ParseResult(text)
        return calls_at(text, 0, pos, final)


class XlamParser(_AfterMarker):
    name = "xlam"
    MARKERS = ("```", "[TOOL_CALLS]", "<tool_call>")
    CLOSES = ("```", "</tool_call>")

    def parse(self, text: str, final: bool) -> ParseResult:
        pos = skip_ws(text, 0)
        if not final and "[TOOL_CALLS]".startswith(text[pos:]):
            return ParseResult("")  # a list or the marker may start here: its whitespace held too
        if text.startswith("[", pos) and not text.startswith("[TOOL_CALLS]", pos):
            return calls_at(text, 0, pos, final)
        return super().parse(text, final)

    def body(self, text: str, start: int, marker: str, final: bool) -> Optional[int]:
        pos = start + len(marker)
        if marker == "```":  # a ```json block (the language tag is optional)
            if text.startswith("json", pos):
                return pos + 4
            if not final and "json".startswith(text[pos:]):
                return None
        return pos


class Phi4MiniJsonParser(_AfterMarker):
    name = "phi4_mini_json"
    MARKERS = ("functools",)


class InternlmParser(_AfterMarker):
    name = "internlm"
    MARKERS = ("<|action_start|><|plugin|>",)
    CLOSES = ("<|action_end|>",)
    needs_special_tokens = True


class JambaParser(_AfterMarker):
    CLOSES = ("</tool_calls>",)
    name = "jamba"
    MARKERS = ("<tool_calls>",)
    needs_special_tokens = True


class HunyuanA13BParser(_AfterMarker):
    CLOSES = ("</tool_calls>",)
    name = "hunyuan_a13b"
    MARKERS = ("<tool_calls>",)


class MinimaxParser(_AfterMarker):
    CLOSES = ("</tool_calls>",)
    name = "minimax"
    MARKERS = ("<tool_calls>",)


class Granite20bFcParser(ToolParser):
    """granite-20b-functioncalling: each call is ``<function_call>`` then its JSON object."""

    name = "granite-20b-fc"
    TAG = "<function_call>"

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(self.TAG)
        if start < 0:
            return ParseResult(text if final else text[:len(text) - held_back(text, (self.TAG,))])
        calls, pos, gaps = [], start, []
        while pos >= 0:
            end = take_call(text, skip_ws(text, pos + len(self.TAG)), final, calls)
            if isinstance(end, ParseResult):
                return end
            if end is None:
                break
            pos, gap = next_call(text, end, final, (self.TAG,))
            gaps.append(gap)
        return ParseResult(text[:start] + "".join(gaps), calls)


class ApertusParser(ToolParser):
    """Apertus: ``<|tools_prefix|>[{"NAME": {arguments}}, ...]<|tools_suffix|>``, each call an
    object with one key; the calls come once the array is complete."""

    name = "apertus"
    START, END = "<|tools_prefix|>", "<|tools_suffix|>"
    needs_special_tokens = True

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(self.START)
        if start < 0:
            return ParseResult(text if final else text[:len(text) - held_back(text, (self.START,))])
        pos = skip_ws(text, start + len(self.START))
        if pos < len(text) and text[pos] != "[":
            return ParseResult(text)
        value, end = decode_at(text, pos)
        if end < 0:
            return ParseResult(text if final else text[:start])
        calls = [_one_key_call(v) for v in value[:MAX_CALLS + 1]]
        if not calls or None in calls or len(calls) > MAX_CALLS:
            return ParseResult(text)
        return ParseResult(text[:start] + next_call(text, end, final, (), (self.END,))[1], calls)


def _one_key_call(obj) -> Optional[ParsedToolCall]:
    """``{"NAME": {arguments}}`` as a call; None if it is not that shape."""
    if not isinstance(obj, dict) or len(obj) != 1:
        return None
    name, args = next(iter(obj.items()))
    arguments = arguments_json(args) if name and isinstance(args, dict) else None
    return ParsedToolCall(name, arguments) if arguments is not None else None


JSON_PARSERS = {"granite-20b-fc": Granite20bFcParser, "granite": GraniteParser, "xlam": XlamParser, "phi4_mini_json": Phi4MiniJsonParser,
                "internlm": InternlmParser, "jamba": JambaParser, "hunyuan_a13b": HunyuanA13BParser,
                "minimax": MinimaxParser, "apertus": ApertusParser}
