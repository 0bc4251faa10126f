"""``--reasoning-parser`` at /v1/chat/completions: the thinking in ``reasoning`` (and vLLM's older
name ``reasoning_content``), the answer in ``content``.

Per request a ``ReasoningPlan``: the markers bound to the tokenizer, where the output starts
(from the rendered prompt: ``chat_template_kwargs: {"enable_thinking": false}`` closes the think
block there, so the output is all answer), and whether the client wants the reasoning
(``include_reasoning: false`` drops it; usage still counts its tokens). A parser with a
``chat_template_kwargs`` switch (``deepseek_v3``'s ``thinking``) reads it from the request. Each
choice has its own ``ReasoningSplit`` (a ``PluginSplit`` over a ``--reasoning-parser-plugin``
class that is not a plain start/end pair; an ``InklingSplit`` for Inkling's typed blocks, which
leaves its blocks in the answer for the ``inkling`` tool parser, ``read_by``; MuseGlimmer's whole
output is the answer for the ``muse_glimmer`` tool parser, which selects its channels). Tool calls are
parsed from the answer only: a call marker written while thinking is text, except the parser's
kept ends (``end_kept``: qwen3's ``<tool_call>``, kimi_k2's section), which end the thinking and
open the answer, so that call is a call; a forced tool_choice's grammar starts after such a
marker, and its parser skips it (``kept_ends``, ``ToolPlan.after_thinking``).
"""

from __future__ import annotations

from typing import Optional, Sequence

from tessellm.reasoning import ReasoningSplit, ThinkMarkers, get_reasoning_parser
from tessellm.reasoning.plugins import PluginParser, PluginSplit
from tessellm.reasoning.inkling import InklingSplit
from tessellm.reasoning.inkling import initial_state as inkling_state
from tessellm.reasoning.muse_glimmer import GlimmerSplit, initial_recipient
from tessellm.reasoning.parsers import PROMPT_TAIL_TOKENS


def reasoning_fields(reasoning: Optional[str], include: bool) -> dict:
    """A message's (or delta's) reasoning keys: both names, the same text; none when there is
    no reasoning or the client asked for none (``include_reasoning: false``)."""
    if reasoning is None or not include:
        return {}
    return {"reasoning": reasoning, "reasoning_content": reasoning}


class ReasoningPlan:
    def __init__(self, name: str, tokenizer, prompt_token_ids: Sequence[int], include: bool,
                 template_kwargs: Optional[dict] = None, plugin: Optional[str] = None, request=None):
        parser = get_reasoning_parser(name, plugin)
        self.plugin: Optional[PluginParser] = None
        if isinstance(parser, PluginParser):
            house = parser.house(tokenizer)  # a plain start/end class runs as a built-in parser
            if house is None:
                self.plugin, self.tokenizer, self.template_kwargs = parser, tokenizer, template_kwargs
            parser = house
        self.request = request
        self.include = include
        if parser is not None:
            self.markers = ThinkMarkers.from_tokenizer(parser, tokenizer)
            self.phase = self.markers.initial_phase(tokenizer, prompt_token_ids, parser.thinking(template_kwargs))
            if parser.blocks:  # Inkling's typed blocks: where the output starts, from the prompt's end
                tail = tokenizer.decode(list(prompt_token_ids[-PROMPT_TAIL_TOKENS:]), skip_special_tokens=False)
                self.block_state = inkling_state(tail)
            if parser.channels:  # MuseGlimmer: the channel the prompt leaves open
                tail = tokenizer.decode(list(prompt_token_ids[-PROMPT_TAIL_TOKENS:]), skip_special_tokens=False)
                self.open_channel = initial_recipient(tail)
        self.keep_blocks = False  # Inkling: the answer keeps its blocks for the inkling tool parser
        self.keep_channels = False  # MuseGlimmer: the answer is the whole output, for its tool parser

    @classmethod
    def for_request(cls, engine, req, prompt_token_ids, template_kwargs=None) -> Optional["ReasoningPlan"]:
        """``template_kwargs``: the request's chat_template_kwargs over the server's defaults
        (DeepSeek-V3.1's ``thinking`` switches its parser)."""
        name = getattr(engine.args, "reasoning_parser", None)
        if name is None or engine.tokenizer is None:
            return None
        return cls(name, engine.tokenizer, prompt_token_ids, req.include_reasoning, template_kwargs,
                   getattr(engine.args, "reasoning_parser_plugin", None), req)

    def adjust(self, params) -> None:
        """Markers that are special tokens must stay in the text to be found there; the engine
        core's grammar gate starts where this split does (``reasoning_phase``)."""
        if self.plugin is None:
            params.reasoning_phase = self.phase
            if self.markers.keep_special_tokens or self.markers.parser.channels:  # (vLLM's adjust_request)
                params.skip_special_tokens = False

    def read_by(self, tool_parser) -> None:
        """The request's tool parser (None: none) reads the answer: the ``inkling`` one reads
        Inkling's blocks, so the split leaves them in (``InklingSplit.keep_blocks``)."""
        self.keep_blocks = getattr(tool_parser, "name", None) == "inkling"
        self.keep_channels = getattr(tool_parser, "name", None) == "muse_glimmer"
        if self.keep_channels and self.plugin is None and self.markers.parser.channels:
            tool_parser.opened = self.open_channel  # it reads the whole output, from that channel

    @property
    def kept_ends(self) -> tuple[str, ...]:
        """The markers that end the thinking and stay in the answer (qwen3's ``<tool_call>``):
        a forced tool_choice's grammar starts after them (``ToolPlan.after_thinking``)."""
        return () if self.plugin is not None else self.markers.parser.end_kept

    def split(self):
        """A fresh split for one choice: ``split(text, token_ids, final) -> (reasoning, answer)``."""
        if self.plugin is not None:
            return PluginSplit(self.plugin.instance(self.tokenizer, self.template_kwargs), self.request)
        if self.markers.parser.blocks:
            return InklingSplit(self.block_state, self.keep_blocks)
        if self.markers.parser.channels:
            split = GlimmerSplit(self.open_channel)
            return _WholeAnswer(split) if self.keep_channels else split
        return ReasoningSplit(self.markers, self.phase)

    def fields(self, reasoning: Optional[str]) -> dict:
        return reasoning_fields(reasoning, self.include)


class _WholeAnswer:
    """A split whose answer is the whole output (the ``muse_glimmer`` tool parser selects its
    channels itself: the tool calls' and the content's; ``to=self`` it drops)."""

    def __init__(self, split):
        self.inner = split

    def split(self, text: str, token_ids: Sequence[int] = (), final: bool = True) -> tuple[Optional[str], str]:
        return self.inner.split(text, token_ids, final)[0], text


class ReasoningStream:
    """One streamed choice: the new reasoning and answer text since the previous call."""

    def __init__(self, plan: ReasoningPlan):
        self.plan = plan
        self.split = plan.split()
        self.sent_reasoning = 0
        self.sent_answer = 0

    def delta(self, text: str, token_ids: Sequence[int], final: bool) -> tuple[dict, str]:
        """``(reasoning fields of the delta, the whole answer so far)``."""
        reasoning, answer = self.split.split(text, token_ids, final)
        new = (reasoning or "")[self.sent_reasoning:]
        self.sent_reasoning = max(self.sent_reasoning, len(reasoning or ""))
        return self.plan.fields(new or None), answer

    def new_answer(self, answer: str) -> str:
        new = answer[self.sent_answer:]
        self.sent_answer = max(self.sent_answer, len(answer))
        return new
