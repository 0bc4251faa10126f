"""Tool-call formats built of special tokens: a section of calls, each between a begin and an
end token, its name and JSON arguments separated by another. Content is the text before the
section. The tokens are special, so the text keeps them (``needs_special_tokens``).

- ``deepseek_v3`` (DeepSeek-V3, R1-0528)::

      <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
      ```json
      {"city": "Paris"}
      ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

- ``deepseek_v31`` (DeepSeek-V3.1)::

      <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>

- ``kimi_k2`` (Kimi-K2); the model names each call ``functions.NAME:INDEX``, which is also its
  id (as vLLM returns it)::

      <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>

A call's arguments come whole once they are a complete JSON object (its name as soon as it is
known). Each call's search ends at its end token, so a parse is linear in the text. Text
outside the calls (between them, after the section) is content too; vLLM's parsers drop it.
"""

from __future__ import annotations

from typing import Optional

from tessellm.entrypoints.openai.tool_parsers_base import (ParsedToolCall, ParseResult, ToolParser, json_object_at,
                                                           skip_ws, tagged_calls)
from tessellm.reasoning.holdback import hold_back


class _MarkedCalls(ToolParser):
    SECTION = BEGIN = END = SECTION_END = ""
    needs_special_tokens = True

    def split(self, body: str) -> tuple[Optional[str], Optional[str], Optional[str]]:
        """``(name, arguments, id)`` of one call's text; name None until it is known,
        arguments None until they are a whole JSON object."""
        raise NotImplementedError

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(self.SECTION)
        if start < 0:
            return ParseResult(text if final else hold_back(text, self.SECTION))
        first = text.find(self.BEGIN, start + len(self.SECTION))
        if first < 0:
            return ParseResult(text if final else text[:start])
        return tagged_calls(text, start, first, final, (self.BEGIN, self.END), self._call, (self.SECTION_END,))

    def _call(self, body: str, whole: bool, _at: int) -> Optional[ParsedToolCall]:
        name, args, call_id = self.split(body)
        if not whole:
            return ParsedToolCall(name, None, call_id)  # the id is whole once the name is
        return ParsedToolCall(name, args, call_id) if name is not None and args is not None else None


class DeepSeekV3Parser(_MarkedCalls):
    name = "deepseek_v3"
    SECTION, BEGIN, END, SEP = "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
    SECTION_END = "<｜tool▁calls▁end｜>"
    FENCE = "```"

    def split(self, body: str):
        sep = body.find(self.SEP)
        line = body.find("\n", sep) if sep >= 0 else -1
        if line < 0:
            return None, None, None
        name = body[sep + len(self.SEP):line].strip() or None
        pos = skip_ws(body, line)
        if body.startswith(self.FENCE, pos):
            pos = body.find("\n", pos)  # past ```json
            pos = len(body) if pos < 0 else pos
        rest = body[pos:].rstrip()
        if rest.endswith(self.FENCE):
            rest = rest[:-len(self.FENCE)]
        return name, json_object_at(rest, 0), None


class DeepSeekV31Parser(_MarkedCalls):
    name = "deepseek_v31"
    SECTION, BEGIN, END, SEP = (DeepSeekV3Parser.SECTION, DeepSeekV3Parser.BEGIN, DeepSeekV3Parser.END,
                                DeepSeekV3Parser.SEP)
    SECTION_END = DeepSeekV3Parser.SECTION_END

    def split(self, body: str):
        sep = body.find(self.SEP)
        if sep < 0:
            return None, None, None
        return body[:sep].strip() or None, json_object_at(body, sep + len(self.SEP)), None


class KimiK2Parser(_MarkedCalls):
    name = "kimi_k2"
    SECTION, BEGIN, END = "<|tool_calls_section_begin|>", "<|tool_call_begin|>", "<|tool_call_end|>"
    SECTION_END = "<|tool_calls_section_end|>"
    ARGS = "<|tool_call_argument_begin|>"

    def split(self, body: str):
        sep = body.find(self.ARGS)
        if sep < 0:
            return None, None, None
        call_id = body[:sep].strip()
        name = call_id.split(":")[0].split(".")[-1] if ":" in call_id else ""
        return name or None, json_object_at(body, sep + len(self.ARGS)), call_id


MARKED_PARSERS = {"deepseek_v3": DeepSeekV3Parser, "deepseek_v31": DeepSeekV31Parser, "kimi_k2": KimiK2Parser}
