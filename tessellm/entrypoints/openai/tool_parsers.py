"""Tool-call parsers: a model's text output -> (content, tool calls), complete or partial.

``--tool-call-parser`` picks one for ``tool_choice: "auto"`` (``TOOL_PARSERS``, vLLM's names):
here ``hermes`` (Hermes / Qwen ``<tool_call>{json}</tool_call>``; ``longcat`` the same in
``<longcat_tool_call>`` tags, ``ernie45`` without the newlines before the first call,
``granite4`` with special-token tags),
``llama3_json`` (Llama 3.x ``{"name", "parameters"}`` objects, optionally after
``<|python_tag|>``, separated by ``;``), ``mistral`` (``[TOOL_CALLS]`` then a JSON array, or
``name[ARGS]{json}`` pieces) and ``openai`` (harmony); Gemma 4's own format (``gemma4``) in
``tool_parsers_gemma4.py``; the XML formats (``qwen3_coder``, ``glm45``, ``deepseek_v32``,
``step3``, ...) in ``tool_parsers_xml.py``, the Python call lists (``pythonic``,
``llama4_pythonic``) in ``tool_parsers_pythonic.py``, the special-token formats
(``deepseek_v3``, ``kimi_k2``, ...) in ``tool_parsers_marked.py`` and the other JSON formats
(``granite``, ``xlam``, ...) in ``tool_parsers_json.py``, more tagged formats (``deepseek_v4``,
``hy_v3``, ``functiongemma``, ``gigachat3``, ...) in ``tool_parsers_tagged.py`` and Kimi K3's
XTML channels in ``tool_parsers_kimi_k3.py``, MiniMax-M3's nested elements in
``tool_parsers_minimax_m3.py``, Inkling's typed blocks in ``tool_parsers_inkling.py``, MuseGlimmer's ATEM calls in its
recipient channels in ``tool_parsers_muse_glimmer.py``. A vLLM parser from
``--tool-parser-plugin FILE`` registers its own names (``tool_parsers_vllm.py``). Two more serve
forced choices: ``RequiredParser`` (the JSON array that ``tool_choice: "required"`` constrains
the output to) and ``NamedParser`` (the output *is* the arguments of the named function).

The contract every parser keeps (``parse(text, final)`` over the whole text so far, partial
calls held back, linear scans, ``MAX_CALLS``) is written in ``tool_parsers_base.py``.

This module is also the import line of a vLLM plugin: ``ToolParser``, ``ToolParserManager``,
``ExtractedToolCallInformation``, ``ToolCall``, ``FunctionCall``, ``DeltaMessage``,
``DeltaToolCall``, ``DeltaFunctionCall``, ``ChatCompletionRequest``,
``ChatCompletionToolsParam`` and ``make_tool_call_id`` are here as vLLM has them.
"""

from __future__ import annotations

import inspect
import os
from typing import Optional

from tessellm.entrypoints.openai.tool_parsers_base import (MAX_CALLS, ParsedToolCall, ParseResult,
                                                           ToolParser, arguments_json, call_from_object, call_sequence,
                                                           decode_at, next_call, partial_name, skip_ws,
                                                           tagged_calls)
from tessellm.entrypoints.openai.tool_parsers_gemma4 import GEMMA4_PARSERS
from tessellm.entrypoints.openai.tool_parsers_inkling import INKLING_PARSERS
from tessellm.entrypoints.openai.tool_parsers_json import JSON_PARSERS
from tessellm.entrypoints.openai.tool_parsers_kimi_k3 import KIMI_K3_PARSERS
from tessellm.entrypoints.openai.tool_parsers_marked import MARKED_PARSERS
from tessellm.entrypoints.openai.tool_parsers_muse_glimmer import MUSE_GLIMMER_PARSERS
from tessellm.entrypoints.openai.tool_parsers_minimax_m3 import MINIMAX_M3_PARSERS
from tessellm.entrypoints.openai.tool_parsers_pythonic import PYTHONIC_PARSERS
from tessellm.entrypoints.openai.tool_parsers_tagged import TAGGED_PARSERS
from tessellm.entrypoints.openai.tool_parsers_vllm import (ChatCompletionRequest,  # noqa: F401 (vLLM's names)
                                                           ChatCompletionToolsParam, DeltaFunctionCall,
                                                           DeltaMessage, DeltaToolCall,
                                                           ExtractedToolCallInformation, FunctionCall, ToolCall,
                                                           ToolParserManager, make_tool_call_id)
from tessellm.entrypoints.openai.tool_parsers_xml import XML_PARSERS
from tessellm.reasoning.holdback import hold_back
from tessellm.reasoning.split import AnswerEnvelope


class HermesParser(ToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(self.START)
        if start < 0:
            return ParseResult(text if final else hold_back(text, self.START))
        return tagged_calls(text, start, start, final, (self.START, self.END), self._call)

    @staticmethod
    def _call(body: str, whole: bool, _at: int) -> Optional[ParsedToolCall]:
        value, stop = decode_at(body, skip_ws(body, 0))
        call = call_from_object(value) if stop > 0 and not body[stop:].strip() else None
        return call if call is not None or whole else ParsedToolCall(partial_name(body), None)


class LongcatParser(HermesParser):
    """LongCat-Flash: Hermes calls in ``<longcat_tool_call>`` tags."""

    name = "longcat"
    START, END = "<longcat_tool_call>", "</longcat_tool_call>"


class Ernie45Parser(HermesParser):
    """ERNIE-4.5: Hermes calls; the newlines before the first ``<tool_call>`` are not content
    (held back while streaming: a call may follow them). The content's ``<response>`` ...
    ``</response>`` envelope is dropped as the ``ernie45`` reasoning parser drops it
    (``AnswerEnvelope``: the open tag where the content opens with it after newlines, the
    content cut at the close tag), as vLLM's parser drops both tags."""

    name = "ernie45"
    RESPONSE = ("<response>", "</response>")

    def parse(self, text: str, final: bool) -> ParseResult:
        result = super().parse(text, final)
        if result.calls or not final:
            result.content = result.content.rstrip("\n")
        result.content = AnswerEnvelope(*self.RESPONSE)(result.content, final)
        return result


class Granite4Parser(HermesParser):
    """Granite 4: Hermes calls, whose tags may be special tokens (kept in the text)."""

    name = "granite4"
    needs_special_tokens = True


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
        return call_sequence(text, pos, final, sep=";")


class MistralParser(ToolParser):
    name = "mistral"
    START, ARGS = "[TOOL_CALLS]", "[ARGS]"
    needs_special_tokens = True

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(self.START)
        if start < 0:
            return ParseResult(text if final else hold_back(text, self.START))
        pos = skip_ws(text, start + len(self.START))
        tail = ""
        if text.startswith("[", pos) and not text.startswith(self.ARGS, pos):
            calls, tail = self._array(text, pos, final)
        else:
            calls = self._pieces(text, pos, final)
        if calls is None:
            return ParseResult(text)
        return ParseResult(text[:start] + tail, calls)

    def _array(self, text: str, pos: int, final: bool) -> tuple[Optional[list[ParsedToolCall]], str]:
        """The calls of the JSON array at ``pos``, and the content after it."""
        value, end = decode_at(text, pos)
        if end < 0:
            return (None if final else [ParsedToolCall(partial_name(text[pos:]), None)]), ""
        calls = [call_from_object(v) for v in value[:MAX_CALLS + 1]] if isinstance(value, list) else [None]
        if len(calls) > MAX_CALLS or not calls or None in calls:
            return None, ""
        return calls, next_call(text, end, final, ())[1]

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
            arguments = arguments_json(value) if end >= 0 and isinstance(value, dict) else None
            if arguments is None or not name:
                return None if final else calls + [ParsedToolCall(name or None, None)]
            calls.append(ParsedToolCall(name, arguments))
            if len(calls) > MAX_CALLS:
                return None
            pos = skip_ws(text, end)
        return calls or (None if final else [])


class ForcedParser(ToolParser):
    """The base of the forced choices' parsers. ``opened``: the markers that end a model's
    thinking and open its answer (the reasoning parser's kept ends: qwen3's ``<tool_call>``,
    ``ReasoningPlan.kept_ends``). The grammar starts after such a marker, so that answer is the
    marker then the forced text: the marker is skipped, and the call comes back as a call."""

    def __init__(self):
        super().__init__()
        self.opened: tuple[str, ...] = ()

    def forced_text(self, text: str) -> str:
        """``text`` less an opening marker (the answer starts with it whole, or not at all)."""
        marker = next((m for m in self.opened if text.startswith(m)), "")
        return text[len(marker):]

    def may_open(self, text: str, final: bool) -> bool:
        """Whether ``text``, while streaming, may still become an opening marker (held back)."""
        return not final and any(m.startswith(text) and m != text for m in self.opened)


class RequiredParser(ForcedParser):
    """``tool_choice: "required"``: a JSON array of ``{"name", "parameters"}`` (constrained)."""

    name = "required"

    def parse(self, text: str, final: bool) -> ParseResult:
        if self.may_open(text, final):
            return ParseResult("")
        forced = self.forced_text(text)
        pos = skip_ws(forced, 0)
        if pos < len(forced) and forced[pos] != "[":
            return ParseResult(text)
        result = call_sequence(forced, skip_ws(forced, pos + 1), final, sep=",", stop="]")
        return ParseResult(text) if result.content and not result.calls else result  # not a call: all of it


class NamedParser(ForcedParser):
    """A named ``tool_choice``: the whole output is that function's arguments. An output with
    nothing but whitespace there (one that ended while still thinking, the reasoning parser's
    answer empty) calls nothing, and has no content: vLLM's parser returns no call for it."""

    name = "named"
    partial_arguments = True

    def __init__(self, function_name: str):
        super().__init__()
        self.function_name = function_name

    def parse(self, text: str, final: bool) -> ParseResult:
        arguments = self.forced_text(text)
        if not arguments.strip() or self.may_open(text, final):
            return ParseResult("")
        return ParseResult("", [ParsedToolCall(self.function_name, arguments)])


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

        super().__init__()
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
    "llama4_json": Llama3JsonParser, "mistral": MistralParser, "openai": HarmonyToolParser, "longcat": LongcatParser,
    "ernie45": Ernie45Parser, "granite4": Granite4Parser,
    **GEMMA4_PARSERS, **JSON_PARSERS, **MARKED_PARSERS, **PYTHONIC_PARSERS, **XML_PARSERS,
    **TAGGED_PARSERS, **KIMI_K3_PARSERS, **MINIMAX_M3_PARSERS, **INKLING_PARSERS,
    **MUSE_GLIMMER_PARSERS,
}


def tool_parser_names() -> list[str]:
    """Every name ``--tool-call-parser`` takes now: the built-in ones and the plugins'."""
    return sorted(set(TOOL_PARSERS) | set(ToolParserManager.tool_parsers))


def checked_tool_parser(name: Optional[str], plugin: Optional[str]) -> Optional[str]:
    """At start-up: import ``--tool-parser-plugin`` (its names join ``--tool-call-parser``'s)
    and check the parser's name. Returns the plugin's absolute path (each API process and Ray
    replica imports it again, from any working directory), or None."""
    if plugin:
        ToolParserManager.import_tool_parser(plugin)
        plugin = os.path.abspath(plugin)
    if name is not None and name not in tool_parser_names():
        raise ValueError(f"--tool-call-parser {name!r} is not a tool-call parser; choose one of "
                         f"{', '.join(tool_parser_names())}, or register it with --tool-parser-plugin FILE.")
    return plugin or None


def _takes_tools(cls: type) -> bool:
    params = inspect.signature(cls.__init__).parameters
    return "tools" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def get_tool_parser(name: str, tokenizer=None, request=None) -> ToolParser:
    """A new parser for one output of ``request`` (its tools type the XML formats' values). A
    name a plugin registered wins over a built-in one, as in vLLM."""
    plugin = ToolParserManager.tool_parsers.get(name)
    if plugin is not None:  # vLLM's constructor: (tokenizer), or (tokenizer, tools) since 0.11
        tools = getattr(request, "tools", None)
        parser = plugin(tokenizer, tools=tools) if _takes_tools(plugin) else plugin(tokenizer)
    elif name in TOOL_PARSERS:
        parser = TOOL_PARSERS[name]()
        parser.model_tokenizer = tokenizer
    else:
        raise ValueError(f"Unknown tool-call parser {name!r}; choose one of {', '.join(tool_parser_names())}"
                         " (or register it with --tool-parser-plugin FILE).")
    parser.request = request
    return parser

