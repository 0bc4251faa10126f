"""vLLM's tool-parser plugin API: ``--tool-parser-plugin FILE`` runs a parser written for vLLM.

A vLLM plugin file registers a ``ToolParser`` subclass under a name::

    from tessellm.entrypoints.openai.tool_parsers import (ExtractedToolCallInformation, FunctionCall,
                                                          ToolCall, ToolParser, ToolParserManager)

    @ToolParserManager.register_module("my_parser")
    class MyParser(ToolParser):
        def extract_tool_calls(self, model_output, request) -> ExtractedToolCallInformation: ...

Only its import line changes (vLLM's ``vllm.entrypoints.openai.protocol`` /
``...tool_parsers`` names are all in ``tessellm.entrypoints.openai.tool_parsers``); then
``tessellm serve --tool-parser-plugin my_parser.py --tool-call-parser my_parser``.

How such a parser is used:

- ``__init__(tokenizer)``: the model's tokenizer, once per request (as vLLM does);
  ``self.vocab`` is its vocabulary. ``adjust_request(request)`` runs before sampling; changes it
  makes to the request in place (``request.skip_special_tokens = False``) are honoured.
- a whole response: ``extract_tool_calls(text, request)``; its ``content`` (or, when it called
  nothing and says no content, the text) and its calls, ids kept.
- a stream, when the parser implements ``extract_tool_calls_streaming``: called once per
  delta as vLLM's serving layer calls it (previous text, current text, delta text, and the
  token ids of each, the ids so far as read-only views, ``IdsSoFar``; the request), its
  ``DeltaMessage``'s content and ``tool_calls`` pieces sent as they come (a first piece without an id gets one). When the output ends, the last
  call's arguments that ``prev_tool_call_arr`` holds but ``streamed_args_for_tool`` has not
  sent yet are sent, as vLLM does. With a ``--reasoning-parser`` the parser sees the answer's
  text only and no token ids (empty lists). A parser that raises mid-stream is logged and
  the rest of the output is content. What it streamed is what the client gets: vLLM's
  streaming and whole-text paths of one parser may disagree, and so may they here.
- a stream, when it implements only ``extract_tool_calls``: that, on the whole text once the
  output is final, sent as the stream's last content and ``delta.tool_calls`` pieces.

A parser that raises is logged and its text returned as content; the server keeps serving.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Callable, Optional, Union

from pydantic import BaseModel, Field

from tessellm.entrypoints.openai import protocol_responses as _protocol
from tessellm.entrypoints.openai.protocol import ChatCompletionRequest  # noqa: F401 (a plugin's type hints)
from tessellm.entrypoints.openai.protocol import ChatTool as ChatCompletionToolsParam  # noqa: F401
from tessellm.entrypoints.openai.protocol_responses import (DeltaFunctionCall, DeltaMessage,  # noqa: F401
                                                            DeltaToolCall, FunctionCall)
from tessellm.entrypoints.openai.tool_parsers_base import (MAX_CALLS, ParsedToolCall, ParseResult, ToolParser,
                                                           strict_json)
from tessellm.reasoning.plugins import IdsSoFar

logger = logging.getLogger(__name__)


def make_tool_call_id() -> str:  # vLLM's (vllm.entrypoints.chat_utils)
    return f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"


class ToolCall(_protocol.ToolCall):
    """vLLM's ``ToolCall``: ``id`` may be left out (one is made up)."""

    id: str = Field(default_factory=make_tool_call_id)


class ExtractedToolCallInformation(BaseModel):
    tools_called: bool  # whether the output called any tool
    tool_calls: list[_protocol.ToolCall]
    content: Optional[str] = None  # the text besides the calls


class ToolParserManager:
    """vLLM's registry of tool parsers by name (a plugin's decorator fills it)."""

    tool_parsers: dict[str, type] = {}
    loaded_plugins: set[str] = set()  # absolute paths of the plugin files imported

    @classmethod
    def get_tool_parser(cls, name: str) -> type:
        if name in cls.tool_parsers:
            return cls.tool_parsers[name]
        raise KeyError(f"tool helper: '{name}' not found in tool_parsers")

    @classmethod
    def register_module(cls, name: Union[str, list[str], None] = None, force: bool = True,
                        module: Optional[type] = None) -> Union[type, Callable]:
        """Register ``module`` (or, as a decorator, the class below) under ``name`` (a name, a
        list of names, or None for the class's own name)."""
        if not isinstance(force, bool):
            raise TypeError(f"force must be a boolean, but got {type(force)}")
        if not (name is None or isinstance(name, str)
                or (isinstance(name, list) and all(isinstance(n, str) for n in name))):
            raise TypeError(f"name must be None, a str or a list of str, but got {type(name)}")

        def register(parser_cls: type) -> type:
            if not (isinstance(parser_cls, type) and issubclass(parser_cls, ToolParser)):
                raise TypeError(f"a tool parser must subclass ToolParser (from "
                                f"tessellm.entrypoints.openai.tool_parsers), got {parser_cls!r}")
            for n in [parser_cls.__name__] if name is None else [name] if isinstance(name, str) else name:
                if not force and n in cls.tool_parsers:
                    raise KeyError(f"{n} is already registered at {cls.tool_parsers[n].__module__}")
                cls.tool_parsers[n] = parser_cls
            return parser_cls

        return register(module) if module is not None else register

    @classmethod
    def import_tool_parser(cls, plugin_path: str) -> None:
        """Import a plugin file (once per process); its decorators register its parsers."""
        path = os.path.abspath(plugin_path)
        if path in cls.loaded_plugins:
            return
        if not os.path.isfile(path):
            raise ValueError(f"--tool-parser-plugin {plugin_path!r}: no such file; give the path of a "
                             "Python file that registers its parser with @ToolParserManager.register_module.")
        module_name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"--tool-parser-plugin {plugin_path!r} is not an importable Python file.")
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(module_name, module)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ValueError(f"--tool-parser-plugin {plugin_path!r} failed to import: "
                             f"{type(exc).__name__}: {exc}. A vLLM plugin imports ToolParser and "
                             "ToolParserManager from tessellm.entrypoints.openai.tool_parsers.") from exc
        cls.loaded_plugins.add(path)


def parse_with_extract(parser: ToolParser, text: str, final: bool) -> ParseResult:
    """A vLLM parser under tessellm's ``parse``: nothing while streaming, then its
    ``extract_tool_calls`` on the whole text."""
    if type(parser).extract_tool_calls is ToolParser.extract_tool_calls:
        raise NotImplementedError(f"{type(parser).__name__} implements neither parse(text, final) nor "
                                  "extract_tool_calls(model_output, request).")
    if not final:
        return ParseResult("")
    try:
        info = parser.extract_tool_calls(text, parser.request)
        calls = [ParsedToolCall(c.function.name, c.function.arguments, c.id)
                 for c in (info.tool_calls if info.tools_called else [])]
    except Exception:  # a plugin's bug must not take the server down
        logger.exception("tool parser %s failed; its output is returned as content", type(parser).__name__)
        return ParseResult(text)
    if len(calls) > MAX_CALLS or not all(isinstance(c.name, str) and strict_json(c.arguments) for c in calls):
        return ParseResult(text)  # e.g. arguments with NaN: not JSON, so not a call (the built-ins' rule)
    content = info.content if info.content is not None and (calls or info.content) else text
    return ParseResult(content or "", calls)


def extract_with_parse(parser: ToolParser, model_output: str, request) -> ExtractedToolCallInformation:
    """vLLM's ``extract_tool_calls`` of a tessellm parser: its final parse."""
    if request is not None:
        parser.request = request
    result = parser.parse(model_output, final=True)
    calls = [ToolCall(id=c.id or make_tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
             for c in result.calls]
    return ExtractedToolCallInformation(tools_called=bool(calls), tool_calls=calls,
                                        content=(result.content or None) if calls else result.content)


def streams_itself(parser: ToolParser) -> bool:
    """Whether ``parser`` (a plugin's) implements vLLM's ``extract_tool_calls_streaming``."""
    return type(parser).extract_tool_calls_streaming is not ToolParser.extract_tool_calls_streaming


class PluginStream:
    """vLLM's serving loop around a plugin's ``extract_tool_calls_streaming``: one call per
    delta with the text and token ids before and after it; the pieces it returns, as they are."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.token_ids: Sequence[int] = IdsSoFar((), 0)  # the previous call's ids (views, as the reasoning's)
        self.failed = False  # it raised: the rest of the output is content

    def delta(self, text: str, token_ids, final: bool) -> tuple[str, list[DeltaToolCall]]:
        """``token_ids``: the output's ids so far (a list that grows; None: none), read in
        place, so a delta costs the delta, not a copy of the whole output."""
        delta_text = text[len(self.text):]
        ids = token_ids if token_ids is not None else ()
        delta_ids = list(ids[len(self.token_ids):])
        previous_text, previous_ids = self.text, self.token_ids
        ids = IdsSoFar(ids, len(ids))
        self.text, self.token_ids = text, ids
        if self.failed:
            return delta_text, []
        if not (delta_text or delta_ids or final):
            return "", []
        try:
            message = self.parser.extract_tool_calls_streaming(previous_text, text, delta_text, previous_ids, ids,
                                                               delta_ids, self.parser.request)
            content = (message.content or "") if message is not None else ""
            pieces = [DeltaToolCall.model_validate(p.model_dump() if isinstance(p, BaseModel) else p)
                      for p in (message.tool_calls or [])] if message is not None else []
            if final:
                pieces += self._unsent_arguments(pieces)
        except Exception:  # a plugin's bug must not take the stream down
            logger.exception("tool parser %s failed while streaming; the rest of its output is content",
                             type(self.parser).__name__)
            self.failed = True
            return delta_text, []
        return content, pieces

    def _unsent_arguments(self, pieces: list[DeltaToolCall]) -> list[DeltaToolCall]:
        """vLLM's end-of-stream check: the last call's arguments as the parser holds them
        (``prev_tool_call_arr``), less what it streamed (``streamed_args_for_tool``)."""
        calls, streamed = self.parser.prev_tool_call_arr, self.parser.streamed_args_for_tool
        index = len(calls) - 1
        if index < 0 or index >= len(streamed) or not isinstance(calls[index], dict):
            return []
        expected = calls[index].get("arguments", {})
        expected = expected if isinstance(expected, str) else json.dumps(expected, ensure_ascii=False)
        sent = streamed[index] + "".join(p.function.arguments or "" for p in pieces
                                         if p.index == index and p.function is not None)
        if not expected.startswith(sent) or len(expected) == len(sent):
            return []
        return [DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=expected[len(sent):]))]
