"""More tagged tool-call formats, built on the shared scans of ``tool_parsers_base.py``:

- ``deepseek_v4`` (DeepSeek-V4): DeepSeek-V3.2's DSML calls (``tool_parsers_xml.py``) in a
  ``<｜DSML｜tool_calls>`` section instead of ``<｜DSML｜function_calls>``.
- ``hy_v3`` (Hunyuan HY-3)::

      <tool_calls><tool_call>get_weather<tool_sep><arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call></tool_calls>

  values typed by the request's tool schema as ``qwen3_coder``'s (no schema: the text).
- ``solar_open2`` (Solar Open 2)::

      <|tool_call:start|>get_weather
      <|tool_arg:start|>city<|tool_arg:value|>Paris<|tool_arg:end|><|tool_call:end|>

  typed as ``hy_v3``'s.
- ``minicpm5`` (MiniCPM 5): ``<function name="get_weather"><param name="city">Paris</param>
  </function>``, typed as ``qwen3_coder``'s.
- ``functiongemma`` (FunctionGemma)::

      <start_function_call>call:get_weather{city:<escape>Paris<escape>,days:<escape>3<escape>}<end_function_call>

  each value between ``<escape>`` tokens, read as strict JSON where it is JSON (``3``), else
  the text (``Paris``).
- ``gigachat3`` (GigaChat 3, 3.1): one JSON call ``{"name", "arguments"}`` after
  ``<|message_sep|>`` and ``function call<|role_sep|>`` (GigaChat 3) or after
  ``<|function_call|>`` (3.1); an end-of-sequence ``</s>`` after it is not content.

- ``cohere_command3`` / ``cohere_command4`` (Command A): a JSON list of
  ``{"tool_call_id", "tool_name", "parameters"}`` between ``<|START_ACTION|>`` and
  ``<|END_ACTION|>``; each call keeps the model's ``tool_call_id`` (as vLLM's).
- ``step3p5`` (Step-3.5) writes ``qwen3_coder``'s calls and ``poolside_v1`` (Poolside) GLM-4.5's:
  they are those parsers under vLLM's names.

Contract as in ``tool_parsers_base.py``: content is all text outside the calls, arguments
come whole once a call is closed (its name as soon as it is known), every search is bounded by
the next marker, so a parse is linear in the text.
"""

from __future__ import annotations

from typing import Optional
from xml.sax.saxutils import unescape as xml_unescape

from tessellm.entrypoints.openai.tool_parsers_base import (MAX_CALLS, ParsedToolCall, ParseResult, ToolParser,
                                                           arguments_json, decode_at, first_of, next_call, skip_ws,
                                                           tagged_calls, take_call, typed_value)
from tessellm.entrypoints.openai.tool_parsers_marked import _MarkedCalls
from tessellm.entrypoints.openai.tool_parsers_xml import DeepSeekV32Parser, Glm45Parser, Qwen3CoderParser
from tessellm.reasoning.holdback import hold_back, held_back


class DeepSeekV4Parser(DeepSeekV32Parser):
    name = "deepseek_v4"
    TOOL, CLOSES = "<｜DSML｜tool_calls>", ("</｜DSML｜tool_calls>",)


class _UnwrappedCalls(_MarkedCalls):
    """Calls each between ``BEGIN`` and ``END``, with no section around them."""

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(self.BEGIN)
        if start < 0:
            return ParseResult(text if final else hold_back(text, self.BEGIN))
        return tagged_calls(text, start, start, final, (self.BEGIN, self.END), self._call)


class HyV3Parser(_MarkedCalls):
    """``<tool_calls>``, then per call ``<tool_call>NAME<tool_sep>`` and its
    ``<arg_key>``/``<arg_value>`` pairs, ``</tool_call>``; ``</tool_calls>``."""

    name = "hy_v3"
    SECTION, BEGIN, END, SECTION_END = "<tool_calls>", "<tool_call>", "</tool_call>", "</tool_calls>"
    SEP, KEY, KEY_END, VALUE, VALUE_END = "<tool_sep>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"

    def split(self, body: str):
        sep = body.find(self.SEP)
        if sep < 0:
            return None, None, None
        name = body[:sep].strip()
        return name or None, self._arguments(body, sep + len(self.SEP), name), None

    def _arguments(self, body: str, pos: int, function: str) -> Optional[str]:
        """The pairs from ``pos`` on as a JSON object; None if one is cut off or anything but
        whitespace lies around them."""
        schemas, args = self.parameter_schemas(function), {}
        while (k := body.find(self.KEY, pos)) >= 0:
            k_end = body.find(self.KEY_END, k)
            v = body.find(self.VALUE, k_end + len(self.KEY_END)) if k_end >= 0 else -1
            v_end = body.find(self.VALUE_END, v) if v >= 0 else -1
            if v_end < 0 or body[pos:k].strip() or body[k_end + len(self.KEY_END):v].strip():
                return None
            key = body[k + len(self.KEY):k_end].strip()
            args[key] = typed_value(body[v + len(self.VALUE):v_end], schemas.get(key))
            pos = v_end + len(self.VALUE_END)
        return arguments_json(args) if not body[pos:].strip() else None


class SolarOpen2Parser(_UnwrappedCalls, HyV3Parser):
    """``<|tool_call:start|>NAME`` and a newline, then per argument ``<|tool_arg:start|>KEY
    <|tool_arg:value|>VALUE<|tool_arg:end|>``, then ``<|tool_call:end|>``; no section around
    the calls."""

    name = "solar_open2"
    BEGIN, END = "<|tool_call:start|>", "<|tool_call:end|>"
    KEY, KEY_END, VALUE, VALUE_END = "<|tool_arg:start|>", "<|tool_arg:value|>", "", "<|tool_arg:end|>"

    def split(self, body: str):
        cut = first_of(body, ("\n", self.KEY))
        if cut < 0:
            return None, None, None
        name = body[:cut].strip()
        return name or None, self._arguments(body, cut, name), None


class MiniCPM5Parser(Qwen3CoderParser):
    """``<function name="NAME"><param name="P">value</param>...</function>``, no wrapper; a
    value is XML text (``&amp;`` and the other four entities decoded, or a ``<![CDATA[...]]>``
    section as written), typed as ``qwen3_coder``'s."""

    name = "minicpm5"
    TOOL = FUNC = "<function name="
    FUNC_END, PARAM, PARAM_END, CLOSES = "</function>", "<param name=", "</param>", ()
    needs_special_tokens = True
    CDATA = ("<![CDATA[", "]]>")

    def value(self, text: str) -> str:
        if text.startswith(self.CDATA[0]) and text.endswith(self.CDATA[1]):
            return text[len(self.CDATA[0]):-len(self.CDATA[1])]
        return xml_unescape(text.strip(), {"&quot;": '"', "&apos;": "'"})


class FunctionGemmaParser(_UnwrappedCalls):
    """``<start_function_call>call:NAME{key:<escape>value<escape>,...}<end_function_call>``."""

    name = "functiongemma"
    BEGIN, END, CALL, ESCAPE = "<start_function_call>", "<end_function_call>", "call:", "<escape>"

    def split(self, body: str):
        pos = skip_ws(body, 0)
        brace = body.find("{", pos)
        if not body.startswith(self.CALL, pos) or brace < 0:
            return None, None, None
        name = body[pos + len(self.CALL):brace].strip()
        if not name.replace("_", "a").replace("-", "a").replace(".", "a").isalnum():
            return None, None, None
        return name, self._arguments(body, brace + 1), None

    def _arguments(self, body: str, pos: int) -> Optional[str]:
        """``key:<escape>value<escape>`` pairs separated by commas up to ``}``; None unless
        only whitespace follows the ``}``."""
        args = {}
        while True:
            pos = skip_ws(body, pos)
            if body.startswith("}", pos):
                return arguments_json(args) if not body[pos + 1:].strip() else None
            colon = body.find(":", pos)
            if colon < 0 or not body.startswith(self.ESCAPE, colon + 1):
                return None
            close = body.find(self.ESCAPE, colon + 1 + len(self.ESCAPE))
            if close < 0:
                return None
            key, text = body[pos:colon].strip(), body[colon + 1 + len(self.ESCAPE):close]
            value, end = decode_at(text, 0)
            args[key] = value if end == len(text) and text else text
            pos = skip_ws(body, close + len(self.ESCAPE))
            if body.startswith(",", pos):
                pos += 1


class GigaChat3Parser(ToolParser):
    """One JSON call after ``function call<|role_sep|>`` (a ``<|message_sep|>`` before it, with
    only whitespace between, belongs to the call) or after ``<|function_call|>``."""

    name = "gigachat3"
    needs_special_tokens = True
    MESSAGE_SEP, HEADERS, EOS = "<|message_sep|>", ("function call<|role_sep|>", "<|function_call|>"), "</s>"

    def parse(self, text: str, final: bool) -> ParseResult:
        head = first_of(text, self.HEADERS)
        if head < 0:
            return ParseResult(text if final else self._held(text))
        header = next(h for h in self.HEADERS if text.startswith(h, head))
        start = head
        before = text[:head].rstrip()
        if before.endswith(self.MESSAGE_SEP):
            start = len(before) - len(self.MESSAGE_SEP)
        calls: list[ParsedToolCall] = []
        pos = skip_ws(text, head + len(header))
        if pos >= len(text) and not final:
            return ParseResult(text[:start], [ParsedToolCall(None, None)])
        end = take_call(text, pos, final, calls)
        if isinstance(end, ParseResult):
            return end
        if end is None:
            return ParseResult(text[:start], calls)
        return ParseResult(text[:start] + next_call(text, end, final, (), (self.EOS,))[1], calls)

    def _held(self, text: str) -> str:
        """Streamed content with no call yet: less a trailing ``<|message_sep|>`` (and the
        whitespace after it), or a piece that may start a marker."""
        cut = len(text) - held_back(text, self.HEADERS + (self.MESSAGE_SEP,))
        before = text[:cut].rstrip()
        return before[:-len(self.MESSAGE_SEP)] if before.endswith(self.MESSAGE_SEP) else text[:cut]




class CohereCommandParser(ToolParser):
    """Cohere Command A: ``<|START_ACTION|>[{"tool_call_id": "0", "tool_name": NAME,
    "parameters": {...}}, ...]<|END_ACTION|>``; each call keeps the model's ``tool_call_id``
    (as vLLM's). The reasoning parser of the same name takes the thinking block first.

    A list followed by text other than the end tag is not a call, so the stream holds the calls
    (names included) until ``<|END_ACTION|>`` or the end of the output: streamed == whole."""

    name = "cohere_command3"
    needs_special_tokens = True
    START, END = "<|START_ACTION|>", "<|END_ACTION|>"

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(self.START)
        if start < 0:
            return ParseResult(text if final else hold_back(text, self.START))
        calls: list[ParsedToolCall] = []
        held = ParseResult(text[:start], [ParsedToolCall(None, None)])  # the list not closed yet
        pos = skip_ws(text, start + len(self.START))
        if pos >= len(text) or text[pos] != "[":
            return ParseResult(text if final or pos < len(text) else text[:start])
        pos = skip_ws(text, pos + 1)
        while pos < len(text) and text[pos] != "]":
            value, end = decode_at(text, pos)
            call = self._call(value) if end > 0 else None
            if call is None or len(calls) >= MAX_CALLS:
                return ParseResult(text) if final or end > 0 else held
            calls.append(call)
            pos = skip_ws(text, end)
            pos = skip_ws(text, pos + 1) if text.startswith(",", pos) else pos
        if pos >= len(text):
            return ParseResult(text) if final else held
        after = skip_ws(text, pos + 1)
        if text.startswith(self.END, after):
            after += len(self.END)
        elif after < len(text) and (final or not self.END.startswith(text[after:])):
            return ParseResult(text)  # more than the end tag after the list: not a call
        elif not final:
            return held
        return ParseResult(text[:start] + next_call(text, after, final, ())[1], calls)

    @staticmethod
    def _call(obj) -> Optional[ParsedToolCall]:
        if not isinstance(obj, dict) or not isinstance(obj.get("tool_name"), str) or not obj["tool_name"]:
            return None
        args = obj.get("parameters", {})
        text = arguments_json(args) if isinstance(args, dict) else None
        call_id = obj.get("tool_call_id")
        return ParsedToolCall(obj["tool_name"], text, None if call_id is None else str(call_id)) if text else None


class CohereCommand4Parser(CohereCommandParser):
    name = "cohere_command4"


TAGGED_PARSERS = {"deepseek_v4": DeepSeekV4Parser, "hy_v3": HyV3Parser, "functiongemma": FunctionGemmaParser,
                  "gigachat3": GigaChat3Parser, "cohere_command3": CohereCommandParser,
                  "cohere_command4": CohereCommand4Parser,
                  "solar_open2": SolarOpen2Parser, "minicpm5": MiniCPM5Parser,
                  "step3p5": Qwen3CoderParser, "poolside_v1": Glm45Parser}  # their formats, as vLLM's parsers read them
