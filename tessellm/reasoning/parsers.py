"""Reasoning parsers: where a thinking model's reasoning ends and its answer begins.

``--reasoning-parser NAME`` (an engine flag, so the engine core and the server agree) names one:

- implicit start (``deepseek_r1``): everything before ``</think>`` is reasoning; the opening
  ``<think>`` may be missing (DeepSeek-R1's template puts it in the prompt). No ``</think>``:
  all reasoning.
- opening required (``mistral``): reasoning only inside ``[THINK]`` ... ``[/THINK]`` that opens
  the output; an output that does not open with it is all answer.
- the others vLLM has (``qwen3``, ``deepseek_v3``, ``ernie45``, ``gemma4``, ``glm45``,
  ``granite``, ``hunyuan_a13b``, ``kimi_k2``, ``seed_oss``, ...; the table below,
  docs/reasoning.md) are one of those two rules with their own markers, spellings, answer
  envelope, reasoning label or ``chat_template_kwargs`` switch. ``qwen3`` (vLLM's current
  one) is ``deepseek_r1``'s rule (Qwen3's thinking templates put ``<think>\n`` in the prompt;
  older ones let the model write it) unless ``enable_thinking`` is false (then all answer), and
  ``<tool_call>`` also ends its thinking (Qwen3.5 may call a tool without closing it).
- ``openai_gptoss``: gpt-oss's harmony format (``harmony.py``): the output is messages on
  channels, the analysis channel is reasoning, the final channel the answer, and messages to
  ``functions.NAME`` are tool calls. Chosen by itself for a gpt-oss checkpoint
  (``resolve_reasoning_parser``). For the grammar gate its "markers" are the analysis and
  final channels' headers: structured output constrains the final channel.

- ``muse_glimmer``: MuseGlimmer's recipient channels (``muse_glimmer.py``): ``to=self`` bodies
  are reasoning, ``to=user`` and untagged ones the answer.

The prompt decides where the output starts (``initial_phase``): a template that ends the prompt
inside an open think block starts the output in reasoning, one that closes an (empty) block
last starts it in the answer; otherwise the parser's own rule above applies.

A ``--reasoning-parser-plugin`` file registers vLLM-style parser classes (``plugins.py``).

The server splits the text with ``split.ReasoningSplit``; the engine core starts a request's
structured-output grammar only once its reasoning ended (``structured_output/reasoning.py``),
on the markers' token ids (``ThinkMarkers``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Optional

REASONING = "reasoning"  # the output starts inside the reasoning
ANSWER = "answer"  # the output is all answer
UNDECIDED = "undecided"  # reasoning only if the output opens with the start marker (mistral)


@dataclass(frozen=True)
class ReasoningParser:
    """One model family's markers and rules (the table below; docs/reasoning.md)."""

    name: str
    implicit_start: bool  # the output is reasoning from its first token, with or without ``start``
    start: str = "<think>"
    end: str = "</think>"
    harmony: bool = False  # the output is harmony messages: the server parses it as such
    start_alts: tuple[str, ...] = ()  # other spellings of ``start`` (granite: "Here's ...")
    end_alts: tuple[str, ...] = ()
    end_kept: tuple[str, ...] = ()  # end the thinking but open the answer (Kimi K2's tool calls)
    # The answer's own envelope: ``answer_open`` dropped where the answer opens with it (after
    # newlines; ERNIE's "<response>"), the answer cut at ``answer_close`` (Hunyuan's "\n</answer>").
    answer_open: str = ""
    answer_close: str = ""
    # chat_template_kwargs that turn thinking on (DeepSeek-V3.1's ``thinking``); off, the output
    # is all answer. Empty: the parser does not read them.
    thinking_kwargs: tuple[str, ...] = ()
    thinking_default: bool = False  # thinking on when the request names none of them
    thinking_off: tuple[str, ...] = ()  # a string value of them that turns thinking off (Hunyuan's "no_think")
    inline: bool = False  # the thinking stays in ``content``, ``start`` put back before it
    trim_newline: bool = False  # one "\n" right before and one right after the end marker dropped
    reasoning_label: str = ""  # dropped where the reasoning opens with it (Gemma 4's "thought\n")
    # vLLM's parser engine: a start marker met inside the thinking and an end marker met in the
    # answer (after the thinking ended) are dropped, not text
    drop_strays: bool = False
    # Typed message blocks in any order (Inkling's): the server splits them with
    # ``inkling.InklingSplit``; ``start`` / ``end`` are the thinking block's kind and end markers
    blocks: bool = False
    # Recipient-addressed channels (MuseGlimmer's): the server splits them with
    # ``muse_glimmer.GlimmerSplit``; ``start`` / ``end`` are the reasoning and answer headers
    channels: bool = False

    @property
    def starts(self) -> tuple[str, ...]:
        return (self.start, *self.start_alts)

    @property
    def ends(self) -> tuple[str, ...]:
        return (self.end, *self.end_alts, *self.end_kept)

    def thinking(self, template_kwargs: Optional[dict]) -> Optional[bool]:
        """Whether the request turned thinking on; None: this parser does not ask."""
        if not self.thinking_kwargs:
            return None
        given = [self._turns_on(template_kwargs[k]) for k in self.thinking_kwargs if k in (template_kwargs or {})]
        return any(given) if given else self.thinking_default

    def _turns_on(self, value) -> bool:
        return bool(value) and not (isinstance(value, str) and value in self.thinking_off)

    def initial_phase(self, prompt_tail: str, thinking: Optional[bool] = None) -> str:
        """Where the output starts, from the end of the prompt's text (special tokens kept)
        and, for a parser with ``thinking_kwargs``, the request's switch (None: not known,
        as in the engine core, which sees the prompt only)."""
        if thinking is False:
            return ANSWER
        opened = max(prompt_tail.rfind(s) for s in self.starts)
        closed, end = max((prompt_tail.rfind(e), e) for e in self.ends)
        if opened > closed:
            return REASONING  # the template opened the block ("...<think>\n")
        if closed >= 0 and not prompt_tail[closed + len(end):].strip():
            return ANSWER  # the template closed it ("<think>\n\n</think>\n\n")
        if self.thinking_kwargs and thinking is None:
            return UNDECIDED  # the engine core does not know the switch: the output tells
        return REASONING if self.implicit_start else UNDECIDED


_GRANITE = dict(start="Here is my thought process:", start_alts=("Here's my thought process:",),
                end="Here is my response:", end_alts=("Here's my response:",))
_DEEPSEEK_V3 = dict(implicit_start=True, thinking_kwargs=("thinking", "enable_thinking"))
_HUNYUAN = dict(implicit_start=True, thinking_kwargs=("reasoning_effort",), thinking_off=("no_think",))
# Qwen3's: implicit start unless enable_thinking is false; <tool_call> ends the thinking too
_QWEN3 = dict(implicit_start=True, thinking_kwargs=("enable_thinking",), thinking_default=True,
              end_kept=("<tool_call>",), drop_strays=True)
_COHERE = dict(implicit_start=False, start="<|START_THINKING|>", end="<|END_THINKING|>",
               answer_open="<|START_RESPONSE|>", answer_close="<|END_RESPONSE|>")

# Inkling's typed blocks (inkling.py): a thinking block is <|content_thinking|> ... <|end_message|>
_INKLING = dict(implicit_start=False, start="<|content_thinking|>", end="<|end_message|>",
                end_alts=("<|content_model_end_sampling|>",), blocks=True)

# MuseGlimmer's channels (muse_glimmer.py): to=self<|message|> ... <|eom|> is reasoning
_MUSE_GLIMMER = dict(implicit_start=False, start="to=self<|message|>", end="to=user<|message|>", channels=True)

REASONING_PARSERS: dict[str, ReasoningParser] = {p.name: p for p in (
    ReasoningParser("deepseek_r1", implicit_start=True),
    ReasoningParser("qwen3", **_QWEN3),
    ReasoningParser("openai_gptoss", implicit_start=True, start="<|channel|>analysis<|message|>",
                    end="<|channel|>final<|message|>", harmony=True),
    # vLLM's other parsers, under its names
    ReasoningParser("deepseek_v3", **_DEEPSEEK_V3),  # DeepSeek-V3.1: R1's rule with thinking on
    ReasoningParser("holo2", **_DEEPSEEK_V3, thinking_default=True),
    ReasoningParser("ernie45", implicit_start=True, answer_open="<response>", answer_close="</response>"),
    ReasoningParser("glm45", **_DEEPSEEK_V3, thinking_default=True, drop_strays=True),  # holo2's rule
    ReasoningParser("granite", implicit_start=False, **_GRANITE),
    ReasoningParser("kimi_k2", implicit_start=True, thinking_kwargs=("thinking",), thinking_default=True,
                    end_kept=("<|tool_calls_section_begin|>",), drop_strays=True),
    ReasoningParser("hunyuan_a13b", implicit_start=False, start="<think>\n", end="\n</think>\n<answer>\n",
                    answer_close="\n</answer>"),
    ReasoningParser("minimax_m2", implicit_start=True),
    ReasoningParser("minimax_m2_append_think", implicit_start=True, inline=True),
    ReasoningParser("inkling", **_INKLING),
    ReasoningParser("muse_glimmer", **_MUSE_GLIMMER),
    ReasoningParser("mistral", implicit_start=False, start="[THINK]", end="[/THINK]", drop_strays=True),
    ReasoningParser("olmo3", implicit_start=True),
    ReasoningParser("seed_oss", implicit_start=True, start="<seed:think>", end="</seed:think>", drop_strays=True),
    ReasoningParser("step3", implicit_start=True),
    ReasoningParser("step3p5", implicit_start=True, trim_newline=True),
    ReasoningParser("cohere_command3", **_COHERE),
    ReasoningParser("cohere_command4", **_COHERE),
    ReasoningParser("deepseek_v4", **_DEEPSEEK_V3, thinking_default=True, end_kept=("<｜DSML｜tool_calls>",),
                    drop_strays=True),
    ReasoningParser("gemma4", implicit_start=False, start="<|channel>", end="<channel|>",
                    end_kept=("<|tool_call>",), reasoning_label="thought\n", drop_strays=True),
    ReasoningParser("hy_v3", **_HUNYUAN),  # thinking only with a reasoning_effort other than no_think
    ReasoningParser("hy_v4", **_HUNYUAN, thinking_default=True),  # its template's default effort: high
    ReasoningParser("kimi_k3", implicit_start=False, start="<|open|>think<|sep|>", end="<|close|>think<|sep|>",
                    thinking_kwargs=("thinking", "enable_thinking"), thinking_default=True),
    ReasoningParser("ling3", **_DEEPSEEK_V3, thinking_default=True, end_kept=("<tool_call>",), drop_strays=True),
    ReasoningParser("minimax_m3", implicit_start=False, start="<mm:think>", end="</mm:think>"),
    ReasoningParser("nemotron_v3", **_QWEN3),
    ReasoningParser("poolside_v1", **_DEEPSEEK_V3),  # deepseek_v3's rule (Laguna)
)}
# vLLM's second names for a parser: GLM-4.7's, Xiaomi MiMo's
REASONING_PARSERS.update({alias: replace(REASONING_PARSERS[name], name=alias)
                          for alias, name in (("glm47", "glm45"), ("mimo", "qwen3"))})
HARMONY_MODEL_TYPES = ("gpt_oss",)  # checkpoints whose chat format is harmony


def resolve_reasoning_parser(name: Optional[str], hf_config) -> Optional[str]:
    """The parser in force: ``name`` (the flag), else ``openai_gptoss`` for a gpt-oss
    checkpoint (its output is unreadable without it), else None."""
    if name is not None:
        return name
    text_config = getattr(hf_config, "text_config", None) or hf_config
    return "openai_gptoss" if getattr(text_config, "model_type", None) in HARMONY_MODEL_TYPES else None


def check_reasoning_parser(name: Optional[str], plugin: Optional[str] = None) -> None:
    """Refuse an unknown name (naming the known ones); ``plugin``: a ``--reasoning-parser-plugin``
    file, loaded here, whose parsers count as known."""
    from tessellm.reasoning.plugins import load_plugin

    known = {**REASONING_PARSERS, **(load_plugin(plugin) if plugin else {})}
    if name is not None and name not in known:
        raise ValueError(f"Unknown reasoning parser {name!r}; choose one of "
                         f"{', '.join(sorted(known))}" + ("" if plugin else
                         " (or register your own with --reasoning-parser-plugin FILE)") + ".")


def get_reasoning_parser(name: str, plugin: Optional[str] = None):
    """The ``ReasoningParser`` for ``name``, or a ``plugins.PluginParser`` for a name the
    ``plugin`` file registers (a plugin's name wins over a built-in one, as in vLLM)."""
    check_reasoning_parser(name, plugin)
    if plugin:
        from tessellm.reasoning.plugins import PluginParser, load_plugin

        found = load_plugin(plugin).get(name)
        if found is not None:
            return PluginParser(name, found)
    return REASONING_PARSERS[name]


PROMPT_TAIL_TOKENS = 64  # of the prompt, decoded to find its last think marker


@dataclass(frozen=True)
class ThinkMarkers:
    """A parser bound to a tokenizer: the markers' token ids, and how to read them back."""

    parser: ReasoningParser
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]
    keep_special_tokens: bool  # a marker is a special token: decode with skip_special_tokens off
    other_end_ids: tuple[tuple[int, ...], ...] = ()  # the end's other spellings (``end_alts``, ``end_kept``)
    # ids -> text (special tokens kept): where an end token's spelling was also written in pieces
    # before it, the split counts those copies (None: the first copy in the text is the token's)
    decode: Optional[Callable[[Sequence[int]], str]] = field(default=None, compare=False, repr=False)

    @classmethod
    def from_tokenizer(cls, parser: ReasoningParser, tokenizer) -> "ThinkMarkers":
        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        hidden = any(tokenizer.decode(list(ids(text)), skip_special_tokens=True) != text
                     for text in (*parser.starts, *parser.ends))
        return cls(parser, ids(parser.start), ids(parser.end), hidden, tuple(ids(e) for e in parser.ends[1:]),
                   lambda token_ids: tokenizer.decode(list(token_ids), skip_special_tokens=False))

    @property
    def end_token_ids(self) -> Optional[dict[int, str]]:
        """Each spelling of the end by its id, when each is one token (Qwen3's ``</think>`` and
        ``<tool_call>``): then the split, as the grammar gate, ends the thinking at the first of
        those tokens among the ids (the same characters spelled from other tokens stay text).
        None: the text decides."""
        ends = (self.end_ids, *self.other_end_ids)
        if not all(len(e) == 1 for e in ends):
            return None
        return {e[0]: spelling for e, spelling in zip(ends, self.parser.ends)}

    def initial_phase(self, tokenizer, prompt_token_ids, thinking: Optional[bool] = None) -> str:
        tail = tokenizer.decode(list(prompt_token_ids[-PROMPT_TAIL_TOKENS:]), skip_special_tokens=False)
        return self.parser.initial_phase(tail, thinking)
