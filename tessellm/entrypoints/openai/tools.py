"""Tool calling on /v1/chat/completions: tool_choice, the forced-call schema, and tool_calls in
responses and streams.

``tool_choice`` (default "auto" when ``tools`` are given, as OpenAI's):

- ``"none"``: plain text; the tools are still shown to the model through the chat template.
- ``"auto"``: the model decides; its text is parsed by the server's ``--tool-call-parser``.
- ``"required"``: structured output forces a JSON array of ``{"name", "parameters"}`` calls
  (one at most with ``parallel_tool_calls: false``), each valid against its function's schema.
- ``{"type": "function", "function": {"name": F}}``: structured output forces F's arguments.
- required and named with a parser that reads them natively (``forced_natively``: ``muse_glimmer``,
  vLLM's ``supports_required_and_named = False``): no grammar; the output is parsed as for "auto".

``ToolCallView`` turns the text into ``tool_calls`` (ids ``call_<24 hex>``, or 9 alphanumerics
for mistral) for a whole response, or into ``delta.tool_calls`` pieces for a stream: the first
piece of call ``i`` carries id, type and name; later pieces append to its arguments.
"""

from __future__ import annotations

import json
import secrets
import string
from typing import Optional

from tessellm.entrypoints.openai.errors import OpenAIError, bad_request
from tessellm.entrypoints.openai.protocol_responses import (DeltaFunctionCall, DeltaToolCall, FunctionCall,
                                                            ToolCall)
from tessellm.entrypoints.openai.tool_parsers import (ForcedParser, NamedParser, ParsedToolCall, RequiredParser,
                                                      TOOL_PARSERS, ToolParser, ToolParserManager, get_tool_parser,
                                                      tool_parser_names)
from tessellm.entrypoints.openai.tool_parsers_vllm import PluginStream, streams_itself
from tessellm.structured_output.grammar import check_limits
from tessellm.structured_output.params import StructuredOutputsParams

_ANY_OBJECT = {"type": "object"}


class ToolPlan:
    """What a chat request's tools mean for rendering, constraining and parsing its output."""

    def __init__(self, req, tool_parser: Optional[str], tokenizer=None, plugin: Optional[str] = None):
        """``tool_parser``: the server's --tool-call-parser; ``plugin``: its --tool-parser-plugin
        file (imported once per process, so a Ray Serve replica finds the names too)."""
        self.tools = req.tools or []
        self.mode, self.function = _mode(req, self.tools)
        self.parallel = req.parallel_tool_calls is not False
        self.parser: Optional[ToolParser] = None
        self._another = None  # a new auto parser for another choice (a plugin's stream keeps state)
        self._views = 0
        for i, tool in enumerate(self.tools):
            _check_parameters(i, tool.function.parameters)
        if self.mode == "auto":
            if tool_parser is None:
                raise bad_request("tool_choice 'auto' needs a tool-call parser: start the server with "
                                  f"--tool-call-parser ({', '.join(tool_parser_names())}), or use tool_choice "
                                  "'required' or a named function.", "tool_choice")
            self.parser = _auto_parser(req, tool_parser, tokenizer, plugin)
            self._another = lambda: _auto_parser(req, tool_parser, tokenizer, plugin)
        elif self.mode != "none" and getattr(TOOL_PARSERS.get(tool_parser or ""), "forced_natively", False):
            self.parser = _auto_parser(req, tool_parser, tokenizer, plugin)  # no grammar: the parser reads it
            self._another = lambda: _auto_parser(req, tool_parser, tokenizer, plugin)
        elif self.mode == "required":
            self.parser = RequiredParser()
        elif self.mode == "named":
            self.parser = NamedParser(self.function)

    def template_tools(self) -> Optional[list[dict]]:
        """The tools as the chat template expects them (None: no tools)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] or None

    def forced_schema(self) -> Optional[dict]:
        """The JSON schema that structured output enforces, or None (none/auto)."""
        if self.mode == "named" and isinstance(self.parser, NamedParser):
            tool = next(t for t in self.tools if t.function.name == self.function)
            return tool.function.parameters or _ANY_OBJECT
        if self.mode != "required" or not isinstance(self.parser, RequiredParser):
            return None
        variants = [{"type": "object",
                     "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                    "parameters": t.function.parameters or _ANY_OBJECT},
                     "required": ["name", "parameters"], "additionalProperties": False}
                    for t in self.tools]
        schema = {"type": "array", "minItems": 1,
                  "items": variants[0] if len(variants) == 1 else {"anyOf": variants}}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    def after_thinking(self, kept_ends: tuple[str, ...]) -> None:
        """A forced choice's parser skips a marker that ended the thinking and opened the
        answer (``kept_ends``, the reasoning plan's): the grammar starts after it."""
        if isinstance(self.parser, ForcedParser):
            self.parser.opened = kept_ends

    def view(self) -> Optional["ToolCallView"]:
        """One choice's view. A plugin that streams itself keeps its stream's state in the parser
        (vLLM's ``prev_tool_call_arr``, ``streamed_args_for_tool``, ...), as does a built-in one
        that parses incrementally (``keeps_state``): each choice after the first gets a parser of
        its own (``n`` > 1)."""
        if self.parser is None:
            return None
        parser = self.parser
        if self._views and self._another is not None and (streams_itself(parser) or parser.keeps_state):
            parser = self._another()
        self._views += 1
        return ToolCallView(parser)


def _auto_parser(req, name: str, tokenizer, plugin: Optional[str]) -> ToolParser:
    """The server's parser for ``req``; a plugin's failure to start is a 500 naming it."""
    try:
        if plugin:
            ToolParserManager.import_tool_parser(plugin)
        parser = get_tool_parser(name, tokenizer, req)
        parser.adjust_request(req)  # vLLM's hook (a plugin may keep special tokens)
        return parser
    except Exception as exc:
        raise OpenAIError(f"The tool-call parser {name!r} failed to start: {type(exc).__name__}: {exc}. Fix "
                          "its --tool-parser-plugin file or start the server with another --tool-call-parser.",
                          500) from exc


def _mode(req, tools) -> tuple[str, Optional[str]]:
    choice = req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools; give tools or remove tool_choice.", "tool_choice")
        return "none", None
    if choice is None or choice in ("none", "auto", "required"):
        return choice or "auto", None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or "
                          '{"type": "function", "function": {"name": ...}}.', "tool_choice")
    if name not in {t.function.name for t in tools}:
        raise bad_request(f"tool_choice names the function {name!r}, which is not in tools.", "tool_choice")
    return "named", name


def _check_parameters(i: int, parameters: Optional[dict]) -> None:
    if parameters is None:
        return
    try:
        check_limits(StructuredOutputsParams(json=parameters))
    except ValueError as exc:
        raise bad_request(str(exc).replace("structured_outputs.json", f"tools[{i}].function.parameters"),
                          f"tools.{i}.function.parameters") from None


def new_call_id(mistral: bool = False) -> str:
    if mistral:
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))
    return f"call_{secrets.token_hex(12)}"


def tool_call_history(calls: list) -> list[dict]:
    """An assistant message's earlier calls for the chat template (arguments as objects, as the
    templates of tool-calling models expect them)."""
    result = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            arguments = call.function.arguments
        result.append({"id": call.id, "type": "function",
                       "function": {"name": call.function.name, "arguments": arguments}})
    return result


class ToolCallView:
    """One choice's text as content + tool_calls; for a stream, the deltas since last time."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.ids: list[str] = []
        self.sent_content = 0
        self.sent_calls: list[int] = []  # per call: characters of arguments sent (-1: header only)
        # a plugin parser with vLLM's extract_tool_calls_streaming: called per delta instead
        self.plugin = PluginStream(parser) if streams_itself(parser) else None

    def _id(self, i: int, call: Optional[ParsedToolCall] = None) -> str:
        """Call ``i``'s id: the model's own (``call.id``, Kimi-K2's) or a new one, kept."""
        while len(self.ids) <= i:
            self.ids.append(call.id if call is not None and call.id and len(self.ids) == i
                            else new_call_id(self.parser.name == "mistral"))
        return self.ids[i]

    def final(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        result = self.parser.parse(text, final=True)
        calls = [ToolCall(id=self._id(i, c), function=FunctionCall(name=c.name, arguments=c.arguments))
                 for i, c in enumerate(result.calls)]
        return (result.content or None) if calls else result.content, calls

    def delta(self, text: str, final: bool, token_ids=None) -> tuple[str, list[DeltaToolCall]]:
        """New content and tool-call pieces since the previous call (``token_ids``: the output's
        so far, for a plugin's ``extract_tool_calls_streaming``)."""
        if self.plugin is not None:
            content, pieces = self.plugin.delta(text, token_ids, final)
            for piece in pieces:
                if piece.index >= len(self.sent_calls):  # the call's first piece: it has an id
                    self.sent_calls += [0] * (piece.index + 1 - len(self.sent_calls))
                    piece.id, piece.type = piece.id or new_call_id(False), "function"
            return content, pieces
        result = self.parser.parse(text, final)
        content = result.content[self.sent_content:]
        self.sent_content = max(self.sent_content, len(result.content))
        pieces = []
        for i, call in enumerate(result.calls):
            piece = self._piece(i, call)
            if piece is not None:
                pieces.append(piece)
        return content, pieces

    def _piece(self, i: int, call: ParsedToolCall) -> Optional[DeltaToolCall]:
        if i > len(self.sent_calls):
            return None  # an earlier call has no name yet
        if i == len(self.sent_calls):
            if call.name is None:
                return None
            self.sent_calls.append(0)
            args = call.arguments or ""
            self.sent_calls[i] = len(args)
            return DeltaToolCall(index=i, id=self._id(i, call), type="function",
                                 function=DeltaFunctionCall(name=call.name, arguments=args))
        if call.arguments is None or len(call.arguments) <= self.sent_calls[i]:
            return None
        new = call.arguments[self.sent_calls[i]:]
        self.sent_calls[i] = len(call.arguments)
        return DeltaToolCall(index=i, function=DeltaFunctionCall(arguments=new))

    @property
    def num_calls(self) -> int:
        return len(self.sent_calls)
