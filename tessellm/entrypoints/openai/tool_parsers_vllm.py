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
- a stream: the same ``extract_tool_calls`` on the whole text once the output is final, sent
  as the stream's last content and ``delta.tool_calls`` pieces. ``extract_tool_calls_streaming``
  is not called: vLLM feeds it token ids that tessellm's parsers do not see (with a reasoning
  parser the tool parser sees only the answer's text), and parsing the whole text keeps the
  streamed calls exactly equal to the non-streamed ones. The built-in parsers stream as they go.

A parser that raises is logged and its text returned as content; the server keeps serving.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import uuid
from typing import Callable, Optional, Union

from pydantic import BaseModel, Field

from tessellm.entrypoints.openai import protocol_responses as _protocol
from tessellm.entrypoints.openai.protocol import ChatCompletionRequest  # noqa: F401 (a plugin's type hints)
from tessellm.entrypoints.openai.protocol import ChatTool as ChatCompletionToolsParam  # noqa: F401
from tessellm.entrypoints.openai.protocol_responses import (DeltaFunctionCall, DeltaMessage,  # noqa: F401
                                                            DeltaToolCall, FunctionCall)
from tessellm.entrypoints.openai.tool_parsers_base import MAX_CALLS, ParsedToolCall, ParseResult, ToolParser

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
    if len(calls) > MAX_CALLS or any(not isinstance(c.name, str) or not isinstance(c.arguments, str) for c in calls):
        return ParseResult(text)
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
