"""``thinking_token_budget``: a request's thinking capped at N tokens, then the end marker forced.

vLLM's semantics (its ``ThinkingBudgetStateHolder``), over the token ids of the markers:

- the thinking starts after the start marker (``<think>``), in the prompt (a template that opens
  the block) or in the output (a model that writes it); with neither, nothing is counted;
- tokens after the start marker count, prompt tokens after it too (a continued assistant turn);
  once N are there, the end marker (``</think>``, one token or several) is forced, one token a
  step, and the model goes on to answer; a marker of several tokens the model began on its
  last budgeted tokens is completed, not spelled again (vLLM's processor starts it over:
  ``</ </ think>``);
- a prompt whose last start marker is followed by an end marker (``enable_thinking: false``'s
  ``<think>\\n\\n</think>``) starts outside the thinking: nothing is forced unless the model
  opens a new block, which gets a budget of its own (as does every block it opens);
- an end marker the model writes itself (or one of the parser's other ends: Qwen3's
  ``<tool_call>``) ends the thinking; budget 0 forces the end as the first thinking token;
  None (or vLLM's -1) is no budget.

Invariant: the state is a function of the prompt and the accepted output tokens alone
(``ThinkingBudget.catch_up``), so a preempted request rebuilt from its tokens, a prefix-cache
hit, a chunked prefill and n > 1 samples all get the same forcing; a row that verifies draft
``j`` is forced as the state after the accepted tokens and drafts ``0..j-1`` says::

    prompt ... <think> t1 t2 ... tN | </think> answer ...        budget N, one-token end
    prompt ... <think> t1 ... tN | </ th ink> answer ...          budget N, three-token end

The markers come from the engine (``thinking_strings``): ``--reasoning-config``'s
``reasoning_start_str`` / ``reasoning_end_str`` (vLLM's), else the ``--reasoning-parser``'s own.
The front end tokenizes them into ``SamplingParams.thinking_start_ids`` / ``thinking_end_ids``;
the runner keeps one ``ThinkingBudget`` per running request and the sampler forces the token
(``SamplingBatch.forced``): a few list operations per request and step, none per vocabulary entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from tessellm.json_arg import json_object_arg

REASONING_CONFIG_KEYS = ("reasoning_parser", "reasoning_start_str", "reasoning_end_str")
# gpt-oss (harmony): thinking is the analysis channel; its end is the message's end and the
# final channel's header, so the answer follows as harmony wants it
HARMONY_STRINGS = (("<|channel|>analysis<|message|>",),
                   ("<|end|><|start|>assistant<|channel|>final<|message|>", "<|end|>"))
REFUSAL = ("thinking_token_budget is set but this server cannot tell where thinking ends: start it "
           "with --reasoning-parser NAME, or --reasoning-config '{\"reasoning_start_str\": \"<think>\", "
           "\"reasoning_end_str\": \"</think>\"}' (LLM(reasoning_parser=..., reasoning_config=...) "
           "offline); or drop thinking_token_budget.")


def parse_reasoning_config(value) -> Optional[dict]:
    """``--reasoning-config`` (a dict or its JSON) checked: vLLM's keys only, strings."""
    if value is None:
        return None
    value = json_object_arg(value, "reasoning_config",
                            '{"reasoning_start_str": "<think>", "reasoning_end_str": "</think>"}')
    unknown = sorted(set(value) - set(REASONING_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"reasoning_config has unknown keys {unknown}; it takes "
                         f"{', '.join(REASONING_CONFIG_KEYS)}.")
    for key, item in value.items():
        if item is not None and not isinstance(item, str):
            raise ValueError(f"reasoning_config {key} must be a string, got {item!r}.")
    return dict(value)


def check_reasoning_config(value, reasoning_parser: Optional[str], plugin: Optional[str]) -> None:
    """At start-up: a ``--reasoning-config`` must name both markers, with what the reasoning
    parser gives."""
    if value is not None and thinking_strings(reasoning_parser, plugin, value) is None:
        raise ValueError("reasoning_config needs both reasoning_start_str and reasoning_end_str (or a "
                         "reasoning parser, --reasoning-parser or its reasoning_parser key, to take the "
                         "missing one from).")


def thinking_strings(reasoning_parser: Optional[str], plugin: Optional[str],
                     reasoning_config=None) -> Optional[tuple[tuple[str, ...], tuple[str, ...]]]:
    """``(starts, ends)``: the spellings that open the thinking and those that end it, the
    first end being the one forced; None when nothing says (no parser, no config, or a plugin's
    parser that names no markers)."""
    config = parse_reasoning_config(reasoning_config) or {}
    name = config.get("reasoning_parser") or reasoning_parser
    starts: tuple[str, ...] = ()
    ends: tuple[str, ...] = ()
    if name:
        from tessellm.reasoning.parsers import get_reasoning_parser

        parser = get_reasoning_parser(name, plugin)
        if getattr(parser, "harmony", False):
            starts, ends = HARMONY_STRINGS
        elif hasattr(parser, "starts"):
            starts, ends = parser.starts, parser.ends
    start, end = config.get("reasoning_start_str"), config.get("reasoning_end_str")
    if start:
        starts = (start, *(s for s in starts if s != start))
    if end:
        ends = (end, *(e for e in ends if e != end))
    return (starts, ends) if starts and ends else None


def marker_ids(tokenizer, strings: Sequence[str]) -> list[list[int]]:
    """Each spelling's token ids (no special tokens added); one that tokenizes to nothing is an
    error naming it."""
    out = []
    for text in strings:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise ValueError(f"The reasoning marker {text!r} tokenizes to no tokens; fix --reasoning-config.")
        out.append(ids)
    return out


def _last_index(seq: Sequence[int], pattern: Sequence[int], lo: int = 0) -> int:
    """Where the last copy of ``pattern`` in ``seq[lo:]`` starts; -1: none. The candidates (the
    pattern's last token) are found from the end by ``list.index`` (a long prompt without the
    marker costs one pass in C, not a Python loop)."""
    pattern, rev = list(pattern), list(seq[lo:])[::-1]
    j = 0
    while True:
        try:
            j = rev.index(pattern[-1], j)
        except ValueError:
            return -1
        start = len(seq) - j - len(pattern)
        if start >= lo and list(seq[start:start + len(pattern)]) == pattern:
            return start
        j += 1


OUTSIDE, THINKING, FORCING = 0, 1, 2


class ThinkingBudget:
    """One request's place: outside the thinking, thinking (``count`` tokens so far), or
    forcing the end marker (``k`` of its tokens forced so far)."""

    __slots__ = ("budget", "starts", "ends", "forced_end", "window", "phase", "count", "k",
                 "recent", "seen")

    def __init__(self, budget: int, starts: Sequence[Sequence[int]], ends: Sequence[Sequence[int]],
                 prompt: Sequence[int]):
        self.budget = budget
        self.starts = [tuple(s) for s in starts]
        self.ends = [tuple(e) for e in ends]
        self.forced_end = self.ends[0]
        self.window = max(map(len, self.starts + self.ends))
        self.phase, self.count, self.k, self.seen = OUTSIDE, 0, 0, 0
        self._read_prompt(prompt)

    def _read_prompt(self, prompt: Sequence[int]) -> None:
        """vLLM's rule: thinking when the prompt's last start marker has no end after it; its
        tokens after the marker count."""
        opened = max(((at, len(s)) for s in self.starts if (at := _last_index(prompt, s)) >= 0), default=None)
        body = 0 if opened is None else opened[0] + opened[1]
        thinking = opened is not None and not any(_last_index(prompt, e, body) >= 0 for e in self.ends)
        # the prompt's last tokens: a marker the output completes may have begun there (in the
        # thinking, only those after its start marker)
        tail_from = max(body if thinking else 0, len(prompt) - self.window + 1)
        self.recent = list(prompt[tail_from:])
        if thinking:
            self.phase, self.count = THINKING, len(prompt) - body

    def catch_up(self, token_ids: Sequence[int], num_prompt: int) -> None:
        """Read the output tokens not read yet (``token_ids``: prompt and output so far)."""
        for i in range(num_prompt + self.seen, len(token_ids)):
            self.advance(token_ids[i])
        self.seen = len(token_ids) - num_prompt

    def advance(self, token: int) -> None:
        if self.phase == THINKING and self.count >= self.budget:  # this token is the first forced
            self.phase, self.k = FORCING, self._written_of_end()
        recent = self.recent
        recent.append(token)
        if len(recent) > self.window:
            del recent[0]
        if self.phase == FORCING:
            self.k += 1  # this token was forced
            if self.k == len(self.forced_end):
                self._leave()
        elif self.phase == THINKING:
            if self._ends_with(self.ends):
                self._leave()
            else:
                self.count += 1
        elif self._ends_with(self.starts):
            self.phase, self.count = THINKING, 0
            recent.clear()

    def _leave(self) -> None:
        self.phase, self.count, self.k = OUTSIDE, 0, 0
        self.recent.clear()

    def _ends_with(self, markers: list[tuple[int, ...]]) -> bool:
        recent = self.recent
        return any(len(m) <= len(recent) and tuple(recent[len(recent) - len(m):]) == m for m in markers)

    def _written_of_end(self) -> int:
        """How many of the forced end marker's first tokens the thinking already ends with (the
        model began the marker on its last budgeted tokens): the forcing goes on from there,
        never spelling the marker's start twice (``</`` ``</`` ``think>``); 0 for a one-token
        marker."""
        end, recent = self.forced_end, self.recent
        for j in range(min(len(end) - 1, len(recent)), 0, -1):
            if tuple(recent[len(recent) - j:]) == end[:j]:
                return j
        return 0

    def forced(self) -> Optional[int]:
        """The token the next position must take; None: free."""
        if self.phase == FORCING:
            return self.forced_end[self.k]
        if self.phase == THINKING and self.count >= self.budget:
            return self.forced_end[self._written_of_end()]
        return None

    def forced_after(self, drafts: Sequence[int]) -> Optional[int]:
        """``forced()`` after ``drafts`` too (a row that verifies the draft after them)."""
        if not drafts:
            return self.forced()
        probe = ThinkingBudget.__new__(ThinkingBudget)
        for name in self.__slots__:
            setattr(probe, name, getattr(self, name))
        probe.recent = list(self.recent)
        for token in drafts:
            probe.advance(token)
        return probe.forced()


def forced_token(request, pos: int) -> Optional[int]:
    """The token a runner request (``core.input_batch.RunnerRequest``) must sample at output
    index ``pos``: its state (made at its first sampled step, rebuilt if its tokens went back)
    caught up with its accepted output, then the drafts before ``pos``."""
    params, ids, start = request.params, request.token_ids, request.num_prompt_tokens
    num_out = len(ids) - start
    state = request.thinking
    if state is None or state.seen > num_out:
        state = request.thinking = ThinkingBudget(params.thinking_token_budget, params.thinking_start_ids,
                                                  params.thinking_end_ids, ids[:start])
    state.catch_up(ids, start)
    return state.forced_after(request.spec_token_ids[:max(0, pos - num_out)])
