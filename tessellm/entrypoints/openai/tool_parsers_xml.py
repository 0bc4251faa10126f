"""Tool-call formats that write each parameter as tagged text (no JSON): the parameter values
are typed by the request's tool schema (``typed_value``).

- ``qwen3_coder`` / ``qwen3_xml`` (Qwen3-Coder, Qwen3.5)::

      <tool_call>
      <function=get_weather>
      <parameter=city>
      Paris
      </parameter>
      </function>
      </tool_call>

  one newline after ``>`` and before ``</parameter>`` is not part of the value; a parameter
  ends at ``</parameter>``, the next ``<parameter=`` or ``</function>``.
- ``seed_oss`` (Seed-OSS): the same inside ``<seed:tool_call>``; ``minimax_m2`` (MiniMax-M2)::

      <minimax:tool_call>
      <invoke name="get_weather">
      <parameter name="city">Paris</parameter>
      </invoke>
      </minimax:tool_call>

- ``glm45`` / ``glm47`` (GLM-4.5, 4.6, 4.7)::

      <tool_call>get_weather
      <arg_key>city</arg_key>
      <arg_value>Paris</arg_value>
      </tool_call>

  a value whose schema type is not ``string`` is read as JSON (or a Python literal).

Contract as in ``tool_parsers_base.py``: a call's arguments come whole once its closing tag is
generated (its name as soon as it is known); every search is bounded by the next tag, so a
parse is linear in the text. All text outside the calls is content (vLLM's parsers keep only
the text before the first call, but Step-3's).
"""

from __future__ import annotations

from typing import Any, Optional

from tessellm.entrypoints.openai.tool_parsers_base import (MAX_CALLS, ParsedToolCall, ParseResult, ToolParser,
                                                           arguments_json, decode_at, first_of, loose_literal,
                                                           next_call, schema_type, tagged_calls, typed_value)
from tessellm.reasoning.holdback import held_back


def _no_call(text: str, final: bool, markers: tuple[str, ...]) -> ParseResult:
    return ParseResult(text if final else text[:len(text) - held_back(text, markers)])


class Qwen3CoderParser(ToolParser):
    name = "qwen3_coder"
    TOOL, FUNC, FUNC_END = "<tool_call>", "<function=", "</function>"
    PARAM, PARAM_END = "<parameter=", "</parameter>"
    BARE_CALLS = True  # a <function=...> without the <tool_call> tag is a call too (vLLM's fallback)
    CLOSES = ("</tool_call>",)  # after a call: the end tags of its wrappers
    NEXT: tuple[str, ...] = ()  # after a call: what else may start the next one

    def parse(self, text: str, final: bool) -> ParseResult:
        starts = (self.TOOL, self.FUNC) if self.BARE_CALLS else (self.TOOL,)
        start = first_of(text, starts)
        if start < 0:
            return _no_call(text, final, starts)
        calls, pos, gaps = [], start, []
        while (f := text.find(self.FUNC, pos)) >= 0:
            end = text.find(self.FUNC_END, f)
            body_end = end if end >= 0 else len(text)
            gt = text.find(">", f + len(self.FUNC), body_end)
            name = _unquote(text[f + len(self.FUNC):gt]) if gt >= 0 else ""
            if end < 0 and not final:  # still being written: its name once known
                calls.append(ParsedToolCall(name or None, None))
                break
            arguments = self._arguments(text, gt + 1, body_end, name) if name else None
            if arguments is None:
                return ParseResult(text)  # no name, or arguments too deep to write: not a call
            calls.append(ParsedToolCall(name, arguments))
            if len(calls) > MAX_CALLS:
                return ParseResult(text if final else "")
            if end < 0:
                break
            pos, gap = next_call(text, end + len(self.FUNC_END), final, (self.TOOL, self.FUNC) + self.NEXT,
                                 self.CLOSES)
            gaps.append(gap)
            if pos < 0:
                break
        else:  # a <tool_call> with no function in it
            gaps.append(text[pos:] if final and calls and pos > start else "")
        if not calls:
            return ParseResult(text if final else text[:start])
        return ParseResult(text[:start] + "".join(gaps), calls)

    def _arguments(self, text: str, lo: int, hi: int, function: str) -> Optional[str]:
        """The parameters in ``text[lo:hi]`` as a JSON object (None: too deep to write)."""
        schemas, args = self.parameter_schemas(function), {}
        p = text.find(self.PARAM, lo, hi)
        while p >= 0:
            nxt = text.find(self.PARAM, p + len(self.PARAM), hi)
            stop = nxt if nxt >= 0 else hi
            gt = text.find(">", p + len(self.PARAM), stop)
            if gt >= 0:
                close = text.find(self.PARAM_END, gt + 1, stop)
                key, value = self.parameter(text[p + len(self.PARAM):gt],
                                            self.value(text[gt + 1:close if close >= 0 else stop]), schemas)
                args[key] = value
            p = nxt
        return arguments_json(args)

    def parameter(self, head: str, text: str, schemas: dict) -> tuple[str, Any]:
        """A parameter's name and value from its tag's head (``name`` or ``"name"``, up to
        ``>``) and its text, typed by the tool schema."""
        key = _unquote(head)
        return key, typed_value(text, schemas.get(key))

    @staticmethod
    def value(text: str) -> str:
        """A parameter's text without the newline after its tag and the one before its end."""
        text = text[1:] if text.startswith("\n") else text
        return text[:-1] if text.endswith("\n") else text


class SeedOssParser(Qwen3CoderParser):
    """Seed-OSS: Qwen3-Coder's calls inside ``<seed:tool_call>`` (special tokens)."""

    name = "seed_oss"
    TOOL, CLOSES = "<seed:tool_call>", ("</seed:tool_call>",)
    needs_special_tokens = True


class MinimaxM2Parser(Qwen3CoderParser):
    """MiniMax-M2: ``<minimax:tool_call><invoke name="f"><parameter name="p">value</parameter>
    </invoke></minimax:tool_call>`` (names quoted or not, values without surrounding blanks)."""

    name = "minimax_m2"
    TOOL, FUNC, FUNC_END, PARAM = "<minimax:tool_call>", "<invoke name=", "</invoke>", "<parameter name="
    CLOSES = ("</minimax:tool_call>",)
    BARE_CALLS = False

    @staticmethod
    def value(text: str) -> str:
        return text.strip()


class DeepSeekV32Parser(Qwen3CoderParser):
    """DeepSeek-V3.2's DSML: ``<｜DSML｜function_calls><｜DSML｜invoke name="f"><｜DSML｜parameter
    name="p" string="true">value</｜DSML｜parameter></｜DSML｜invoke></｜DSML｜function_calls>``;
    ``string="true"``: the value is the text as written, ``"false"``: JSON (else the text)."""

    name = "deepseek_v32"
    TOOL, FUNC, FUNC_END = "<｜DSML｜function_calls>", "<｜DSML｜invoke name=", "</｜DSML｜invoke>"
    PARAM, PARAM_END, CLOSES = "<｜DSML｜parameter name=", "</｜DSML｜parameter>", ("</｜DSML｜function_calls>",)
    BARE_CALLS = False
    needs_special_tokens = True
    STRING = " string="

    def parameter(self, head: str, text: str, schemas: dict) -> tuple[str, Any]:
        flag = head.rfind(self.STRING)
        if flag < 0:
            return super().parameter(head, text, schemas)
        key, string = _unquote(head[:flag]), _unquote(head[flag + len(self.STRING):]).lower()
        if string == "true":
            return key, text
        value, end = decode_at(text.strip(), 0)  # DSML's other values are JSON; not JSON: the text
        return key, value if end == len(text.strip()) else text


class Step3Parser(MinimaxM2Parser):
    """Step-3: ``<｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke
    name="f"><steptml:parameter name="p">value</steptml:parameter></steptml:invoke>
    <｜tool_call_end｜><｜tool_calls_end｜>`` (values typed by the tool schema)."""

    name = "step3"
    TOOL, FUNC, FUNC_END = "<｜tool_calls_begin｜>", "<steptml:invoke name=", "</steptml:invoke>"
    PARAM, PARAM_END = "<steptml:parameter name=", "</steptml:parameter>"
    CLOSES = ("<｜tool_call_end｜>", "<｜tool_calls_end｜>")
    NEXT = ("<｜tool_call_begin｜>",)  # then "function<｜tool_sep｜>", passed by the search for the invoke
    needs_special_tokens = True


def _unquote(name: str) -> str:
    name = name.strip()
    return name[1:-1] if len(name) >= 2 and name[0] == name[-1] and name[0] in "\"'" else name


class Glm45Parser(ToolParser):
    name = "glm45"
    START, END = "<tool_call>", "</tool_call>"
    KEY, KEY_END, VALUE, VALUE_END = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(self.START)
        if start < 0:
            return _no_call(text, final, (self.START,))
        return tagged_calls(text, start, start, final, (self.START, self.END), self._call)

    def _call(self, body: str, whole: bool, _at: int) -> Optional[ParsedToolCall]:
        cut = first_of(body, ("\n", self.KEY))
        name = body[:cut].strip() if cut >= 0 else (body.strip() if whole else "")
        if not whole:
            return ParsedToolCall(name or None, None)
        args = self._arguments(body, cut if cut >= 0 else len(body), name)
        return ParsedToolCall(name, args) if name and args is not None else None

    def _arguments(self, body: str, pos: int, function: str) -> Optional[str]:
        """The ``<arg_key>``/``<arg_value>`` pairs from ``pos`` on as a JSON object; None if a
        pair is cut off or anything but whitespace lies between pairs."""
        schemas, args = self.parameter_schemas(function), {}
        while (k := body.find(self.KEY, pos)) >= 0:
            if body[pos:k].strip():
                return None
            k_end = body.find(self.KEY_END, k)
            v = body.find(self.VALUE, k_end) if k_end >= 0 else -1
            v_end = body.find(self.VALUE_END, v) if v >= 0 else -1
            if v_end < 0 or body[k_end + len(self.KEY_END):v].strip():
                return None
            key = body[k + len(self.KEY):k_end].strip()
            value = body[v + len(self.VALUE):v_end].strip()
            is_string = key in schemas and schema_type(schemas[key]) == "string"
            args[key] = value if is_string else loose_literal(value)
            pos = v_end + len(self.VALUE_END)
        return arguments_json(args) if not body[pos:].strip() else None


XML_PARSERS = {"qwen3_coder": Qwen3CoderParser, "qwen3_xml": Qwen3CoderParser, "seed_oss": SeedOssParser,
               "minimax_m2": MinimaxM2Parser, "glm45": Glm45Parser, "glm47": Glm45Parser,
               "deepseek_v32": DeepSeekV32Parser, "step3": Step3Parser, "mimo": Qwen3CoderParser}
