"""``--reasoning-parser-plugin FILE``: vLLM's reasoning-parser plugin interface, under tessellm names.

A vLLM plugin runs with its import lines changed::

    from vllm.reasoning import ReasoningParser, ReasoningParserManager      # vLLM
    from vllm.entrypoints.openai.protocol import DeltaMessage
    from tessellm.reasoning.plugins import DeltaMessage, ReasoningParser, ReasoningParserManager

    @ReasoningParserManager.register_module("my_parser")
    class MyParser(ReasoningParser):
        def is_reasoning_end(self, input_ids): ...             # structured output's gate
        def is_reasoning_end_streaming(self, input_ids, delta_ids): ...  # its per-step check
        def extract_content_ids(self, input_ids): ...
        def extract_reasoning(self, model_output, request): ...          # -> (reasoning, content)
        def extract_reasoning_streaming(self, previous_text, current_text, delta_text,
                                        previous_token_ids, current_token_ids, delta_token_ids): ...

``ChatCompletionRequest`` (the ``request`` the methods get; vLLM's
``vllm.entrypoints.openai.protocol`` name) can be imported from here too, for type hints.
vLLM's older method names (``extract_reasoning_content``, ``extract_reasoning_content_streaming``,
with or without a trailing ``request``) work too. ``BaseThinkingReasoningParser`` (vLLM's
``basic_parsers``) needs only ``start_token`` and ``end_token``: such a class, its extraction
methods not overridden, runs as a built-in parser with those markers (``PluginParser.house``),
so it gets the house split's hold-back and stream/whole equality.

Registration keeps no global state: the decorator marks the class, and ``load_plugin`` reads
the marks off the file's module. The file loads once per process (server and engine core).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

_NAMES = "_tessellm_reasoning_parser_names"  # the attribute register_module sets on a class


def __getattr__(name: str):
    """``ChatCompletionRequest``, imported only when a plugin asks for it (the server's protocol)."""
    if name == "ChatCompletionRequest":
        from tessellm.entrypoints.openai.protocol import ChatCompletionRequest

        return ChatCompletionRequest
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class DeltaMessage:
    """What a streaming method returns: the new reasoning and/or content of one delta.
    ``reasoning_content`` is vLLM's older name of ``reasoning``."""

    role: Optional[str] = None
    content: Optional[str] = None
    reasoning: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list] = None

    @property
    def thinking(self) -> Optional[str]:
        return self.reasoning if self.reasoning is not None else self.reasoning_content


def _overrides(obj: Any, name: str, base: type) -> bool:
    return getattr(type(obj), name, None) is not getattr(base, name, None)


class ReasoningParser:
    """vLLM's ``ReasoningParser`` base: subclass it and implement its methods."""

    def __init__(self, tokenizer, *args, **kwargs):
        self.model_tokenizer = tokenizer

    @functools.cached_property
    def vocab(self) -> dict[str, int]:
        return self.model_tokenizer.get_vocab()

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        """Whether the reasoning ended in ``input_ids`` (the prompt's and output's ids)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement is_reasoning_end")

    def is_reasoning_end_streaming(self, input_ids: Sequence[int], delta_ids) -> bool:
        """Whether the reasoning ended with ``delta_ids`` (the step's new ids, the last of
        ``input_ids``). Asked once per step while the thinking runs: override it with a check
        of the delta (as ``BaseThinkingReasoningParser`` does) to make a step cost the delta;
        this default, vLLM's, asks ``is_reasoning_end`` about all the ids every step."""
        return self.is_reasoning_end(input_ids)

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__} does not implement extract_content_ids")

    def count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        return 0

    def extract_reasoning(self, model_output: str, request) -> tuple[Optional[str], Optional[str]]:
        if _overrides(self, "extract_reasoning_content", ReasoningParser):
            return self.extract_reasoning_content(model_output, request)
        raise NotImplementedError(f"{type(self).__name__} implements neither extract_reasoning nor "
                                  "extract_reasoning_content")

    def extract_reasoning_content(self, model_output: str, request) -> tuple[Optional[str], Optional[str]]:
        return self.extract_reasoning(model_output, request)

    def extract_reasoning_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                    current_token_ids, delta_token_ids, *request) -> Optional[DeltaMessage]:
        if _overrides(self, "extract_reasoning_content_streaming", ReasoningParser):
            return self.extract_reasoning_content_streaming(
                previous_text, current_text, delta_text, previous_token_ids, current_token_ids,
                delta_token_ids, *request)
        raise NotImplementedError(f"{type(self).__name__} implements neither extract_reasoning_streaming "
                                  "nor extract_reasoning_content_streaming")

    def extract_reasoning_content_streaming(self, *args) -> Optional[DeltaMessage]:
        return self.extract_reasoning_streaming(*args)


class BaseThinkingReasoningParser(ReasoningParser):
    """vLLM's base for ``start_token`` ... ``end_token`` parsers (DeepSeek-R1's rule: the start
    may be missing; no end: all reasoning). Both markers must be tokens of the vocabulary."""

    start_token: str = ""
    end_token: str = ""

    def __init__(self, tokenizer, *args, **kwargs):
        super().__init__(tokenizer, *args, **kwargs)
        if not self.start_token or not self.end_token:
            raise ValueError(f"{type(self).__name__} must define start_token and end_token.")
        self.start_token_id = self.vocab.get(self.start_token)
        self.end_token_id = self.vocab.get(self.end_token)
        if self.start_token_id is None or self.end_token_id is None:
            raise RuntimeError(f"{type(self).__name__}: the tokenizer has no token {self.start_token!r} "
                               f"or {self.end_token!r}.")

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        for token in reversed(input_ids):
            if token in (self.start_token_id, self.end_token_id):
                return token == self.end_token_id
        return False

    def is_reasoning_end_streaming(self, input_ids: Sequence[int], delta_ids) -> bool:
        """vLLM's: the step's new ids hold the end token (the gate asks only while the thinking
        runs, so each step costs its delta, not the whole output)."""
        return self.end_token_id in delta_ids

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        if self.end_token_id not in input_ids[:-1]:
            return []
        return input_ids[input_ids.index(self.end_token_id) + 1:]

    def extract_reasoning(self, model_output: str, request) -> tuple[Optional[str], Optional[str]]:
        reasoning, content = self._split().split(model_output, [self.end_token_id], final=True)
        return reasoning, content or None

    def extract_reasoning_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                    current_token_ids, delta_token_ids, *request) -> Optional[DeltaMessage]:
        if not hasattr(self, "_stream"):
            self._stream, self._sent = self._split(), (0, 0)
        reasoning, answer = self._stream.split(current_text, current_token_ids, final=False)
        reasoning = reasoning or ""
        new = (reasoning[self._sent[0]:], answer[self._sent[1]:])
        self._sent = (len(reasoning), len(answer))
        return DeltaMessage(reasoning=new[0] or None, content=new[1] or None) if any(new) else None

    def _split(self):
        from tessellm.reasoning.parsers import REASONING, ReasoningParser as House, ThinkMarkers
        from tessellm.reasoning.split import ReasoningSplit

        house = House(type(self).__name__, implicit_start=True, start=self.start_token, end=self.end_token)
        return ReasoningSplit(ThinkMarkers(house, (self.start_token_id,), (self.end_token_id,), False),
                              REASONING)


class ReasoningParserManager:
    """vLLM's registry, as far as a plugin file uses it: ``register_module`` marks the class
    (``load_plugin`` collects the marks); nothing is kept here."""

    @classmethod
    def register_module(cls, name=None, force: bool = True, module: Optional[type] = None):
        def mark(parser_cls: type) -> type:
            if not (isinstance(parser_cls, type) and issubclass(parser_cls, ReasoningParser)):
                raise TypeError(f"register_module wants a subclass of tessellm.reasoning.plugins."
                                f"ReasoningParser, got {parser_cls!r}.")
            names = [name] if isinstance(name, str) else list(name or [parser_cls.__name__])
            setattr(parser_cls, _NAMES, tuple(dict.fromkeys([*vars(parser_cls).get(_NAMES, ()), *names])))
            return parser_cls

        return mark(module) if module is not None else mark


@functools.lru_cache(maxsize=None)
def load_plugin(path: str) -> dict[str, type]:
    """The parsers ``path`` registers, by name; loading it runs it (as vLLM does)."""
    if not os.path.isfile(path):
        raise ValueError(f"--reasoning-parser-plugin {path!r}: no such file; give the path of a "
                         "Python file that registers a parser with @ReasoningParserManager.register_module.")
    module_name = "tessellm_reasoning_plugin_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ValueError(f"--reasoning-parser-plugin {path!r} failed to load: {type(exc).__name__}: {exc}") from exc
    found = {n: obj for obj in vars(module).values() if isinstance(obj, type) for n in vars(obj).get(_NAMES, ())}
    if not found:
        raise ValueError(f"--reasoning-parser-plugin {path!r} registers no reasoning parser; decorate a "
                         "subclass of tessellm.reasoning.plugins.ReasoningParser with "
                         "@ReasoningParserManager.register_module(\"NAME\").")
    return found


@dataclass(frozen=True)
class PluginParser:
    """A plugin's parser class where the house wants a ``parsers.ReasoningParser``."""

    name: str
    cls: type
    harmony: bool = False

    def instance(self, tokenizer, template_kwargs: Optional[dict] = None) -> ReasoningParser:
        """One per request (vLLM's parsers keep per-request state); newer vLLM passes the
        request's ``chat_template_kwargs``, so a class that takes them gets them."""
        params = inspect.signature(self.cls.__init__).parameters
        takes = "chat_template_kwargs" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        return self.cls(tokenizer, chat_template_kwargs=dict(template_kwargs or {})) if takes else self.cls(tokenizer)

    def house(self, tokenizer):
        """The built-in parser this class amounts to (a ``BaseThinkingReasoningParser`` that
        overrides no extraction method), else None."""
        if not issubclass(self.cls, BaseThinkingReasoningParser):
            return None
        own = ("extract_reasoning", "extract_reasoning_content", "extract_reasoning_streaming",
               "extract_reasoning_content_streaming", "is_reasoning_end", "is_reasoning_end_streaming")
        if any(getattr(self.cls, m) is not getattr(BaseThinkingReasoningParser, m) for m in own):
            return None
        from tessellm.reasoning.parsers import ReasoningParser as House

        parser = self.instance(tokenizer)
        return House(self.name, implicit_start=True, start=parser.start_token, end=parser.end_token)


def _accepts_request(method: Callable, positional: int) -> bool:
    params = [p for p in inspect.signature(method).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(params) > positional


class IdsSoFar(Sequence):
    """The first ``n`` of ``ids`` (an output's ids so far, a list that only grows), read in
    place: what a plugin's streaming method gets as ``previous_token_ids`` and
    ``current_token_ids``, so a delta costs the delta, not a copy of the whole output."""

    __slots__ = ("_ids", "_n")

    def __init__(self, ids: Sequence[int], n: int):
        self._ids, self._n = ids, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self._n)
            return list(self._ids[start:stop:step]) if step > 0 else [self._ids[i] for i in range(start, stop, step)]
        if not -self._n <= index < self._n:
            raise IndexError("token index out of range")
        return self._ids[index % self._n]

    def __iter__(self):
        return itertools.islice(self._ids, self._n)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == self._n and all(a == b for a, b in zip(self, other))

    def __add__(self, other) -> list[int]:  # vLLM hands plugins lists: ``previous + delta`` works
        return [*self, *other]

    def __repr__(self) -> str:
        return repr(list(self))


class PluginSplit:
    """``split.ReasoningSplit``'s interface over a plugin's parser: a whole output (the first
    call, final) goes to its ``extract_reasoning``, a stream's deltas to its streaming method,
    whose pieces are added up. The ids reach it as views (``IdsSoFar``), the delta's as a list
    of its own; each method's cost and consistency are the plugin's."""

    def __init__(self, parser: ReasoningParser, request):
        self.parser = parser
        self.request = request
        self.text = ""
        self.ids: Sequence[int] = IdsSoFar((), 0)  # the previous call's ids
        self.reasoning: Optional[str] = None
        self.answer = ""
        self._stream: Optional[Callable] = None  # the streaming method, resolved on first use
        self._takes_request = False

    def split(self, text: str, token_ids: Sequence[int], final: bool) -> tuple[Optional[str], str]:
        seen = len(self.ids)
        if final and not self.text and not seen:
            reasoning, content = self.parser.extract_reasoning(text, self.request)
            return reasoning, content or ""
        delta_text, delta_ids = text[len(self.text):], list(token_ids[seen:])
        if not (delta_text or delta_ids):
            return self.reasoning, self.answer
        current = IdsSoFar(token_ids, len(token_ids))
        args = [self.text, text, delta_text, self.ids, current, delta_ids]
        delta = self._streaming()(*args, *([self.request] if self._takes_request else []))
        self.text, self.ids = text, current
        if delta is not None:
            if delta.thinking is not None:
                self.reasoning = (self.reasoning or "") + delta.thinking
            self.answer += delta.content or ""
        return self.reasoning, self.answer

    def _streaming(self) -> Callable:
        if self._stream is None:
            stream = self.parser.extract_reasoning_streaming
            if not _overrides(self.parser, "extract_reasoning_streaming", ReasoningParser):
                stream = self.parser.extract_reasoning_content_streaming
            self._stream, self._takes_request = stream, _accepts_request(stream, 6)
        return self._stream
