"""Reasoning parsers: where a thinking model's reasoning ends and its answer begins.

``--reasoning-parser NAME`` (an engine flag, so the engine core and the server agree) names one:

- ``deepseek_r1``: everything before ``</think>`` is reasoning; the opening ``<think>`` may be
  missing (DeepSeek-R1's template puts it in the prompt). No ``</think>``: all reasoning.
- ``qwen3``: reasoning only inside ``<think>`` ... ``</think>`` that opens the output; an
  output that does not open with ``<think>`` is all answer (Qwen3 with ``enable_thinking:
  false``, whose template closes an empty think block in the prompt).
- ``openai_gptoss``: gpt-oss's harmony format (``harmony.py``): the output is messages on
  channels, the analysis channel is reasoning, the final channel the answer, and messages to
  ``functions.NAME`` are tool calls. Chosen by itself for a gpt-oss checkpoint
  (``resolve_reasoning_parser``). For the grammar gate its "markers" are the analysis and
  final channels' headers: structured output constrains the final channel.

The prompt decides where the output starts (``initial_phase``): a template that ends the prompt
inside an open think block starts the output in reasoning, one that closes an (empty) block
last starts it in the answer; otherwise the parser's own rule above applies.

The server splits the text with ``split.ReasoningSplit``; the engine core starts a request's
structured-output grammar only once its reasoning ended (``structured_output/reasoning.py``),
on the markers' token ids (``ThinkMarkers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

REASONING = "reasoning"  # the output starts inside the reasoning
ANSWER = "answer"  # the output is all answer
UNDECIDED = "undecided"  # reasoning only if the output opens with the start marker (qwen3)


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    implicit_start: bool  # the output is reasoning from its first token, with or without ``start``
    start: str = "<think>"
    end: str = "</think>"
    harmony: bool = False  # the output is harmony messages: the server parses it as such

    def initial_phase(self, prompt_tail: str) -> str:
        """Where the output starts, from the end of the prompt's text (special tokens kept)."""
        opened, closed = prompt_tail.rfind(self.start), prompt_tail.rfind(self.end)
        if opened > closed:
            return REASONING  # the template opened the block ("...<think>\n")
        if closed >= 0 and not prompt_tail[closed + len(self.end):].strip():
            return ANSWER  # the template closed it ("<think>\n\n</think>\n\n")
        return REASONING if self.implicit_start else UNDECIDED


REASONING_PARSERS: dict[str, ReasoningParser] = {
    "deepseek_r1": ReasoningParser("deepseek_r1", implicit_start=True),
    "qwen3": ReasoningParser("qwen3", implicit_start=False),
    "openai_gptoss": ReasoningParser("openai_gptoss", implicit_start=True,
                                     start="<|channel|>analysis<|message|>",
                                     end="<|channel|>final<|message|>", harmony=True),
}
HARMONY_MODEL_TYPES = ("gpt_oss",)  # checkpoints whose chat format is harmony


def resolve_reasoning_parser(name: Optional[str], hf_config) -> Optional[str]:
    """The parser in force: ``name`` (the flag), else ``openai_gptoss`` for a gpt-oss
    checkpoint (its output is unreadable without it), else None."""
    if name is not None:
        return name
    text_config = getattr(hf_config, "text_config", None) or hf_config
    return "openai_gptoss" if getattr(text_config, "model_type", None) in HARMONY_MODEL_TYPES else None


def check_reasoning_parser(name: Optional[str]) -> None:
    if name is not None and name not in REASONING_PARSERS:
        raise ValueError(f"Unknown reasoning parser {name!r}; choose one of "
                         f"{', '.join(sorted(REASONING_PARSERS))}.")


def get_reasoning_parser(name: str) -> ReasoningParser:
    check_reasoning_parser(name)
    return REASONING_PARSERS[name]


PROMPT_TAIL_TOKENS = 64  # of the prompt, decoded to find its last think marker


@dataclass(frozen=True)
class ThinkMarkers:
    """A parser bound to a tokenizer: the markers' token ids, and how to read them back."""

    parser: ReasoningParser
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]
    keep_special_tokens: bool  # a marker is a special token: decode with skip_special_tokens off

    @classmethod
    def from_tokenizer(cls, parser: ReasoningParser, tokenizer) -> "ThinkMarkers":
        start = tuple(tokenizer.encode(parser.start, add_special_tokens=False))
        end = tuple(tokenizer.encode(parser.end, add_special_tokens=False))
        hidden = any(tokenizer.decode(list(ids), skip_special_tokens=True) != text
                     for ids, text in ((start, parser.start), (end, parser.end)))
        return cls(parser, start, end, hidden)

    @property
    def end_id(self) -> Optional[int]:
        """The end marker's id when it is one token (then the split needs it among the ids)."""
        return self.end_ids[0] if len(self.end_ids) == 1 else None

    def initial_phase(self, tokenizer, prompt_token_ids) -> str:
        tail = tokenizer.decode(list(prompt_token_ids[-PROMPT_TAIL_TOKENS:]), skip_special_tokens=False)
        return self.parser.initial_phase(tail)
