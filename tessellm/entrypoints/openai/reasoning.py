"""``--reasoning-parser`` at /v1/chat/completions: the thinking in ``reasoning`` (and vLLM's older
name ``reasoning_content``), the answer in ``content``.

Per request a ``ReasoningPlan``: the markers bound to the tokenizer, where the output starts
(from the rendered prompt: ``chat_template_kwargs: {"enable_thinking": false}`` closes the think
block there, so the output is all answer), and whether the client wants the reasoning
(``include_reasoning: false`` drops it; usage still counts its tokens). Each choice has its own
``ReasoningSplit``; tool calls are parsed from the answer only, so a ``<tool_call>`` written
while thinking is not a call.
"""

from __future__ import annotations

from typing import Optional, Sequence

from tessellm.reasoning import ReasoningSplit, ThinkMarkers, get_reasoning_parser


def reasoning_fields(reasoning: Optional[str], include: bool) -> dict:
    """A message's (or delta's) reasoning keys: both names, the same text; none when there is
    no reasoning or the client asked for none (``include_reasoning: false``)."""
    if reasoning is None or not include:
        return {}
    return {"reasoning": reasoning, "reasoning_content": reasoning}


class ReasoningPlan:
    def __init__(self, name: str, tokenizer, prompt_token_ids: Sequence[int], include: bool):
        self.markers = ThinkMarkers.from_tokenizer(get_reasoning_parser(name), tokenizer)
        self.phase = self.markers.initial_phase(tokenizer, prompt_token_ids)
        self.include = include

    @classmethod
    def for_request(cls, engine, req, prompt_token_ids) -> Optional["ReasoningPlan"]:
        name = getattr(engine.args, "reasoning_parser", None)
        if name is None or engine.tokenizer is None:
            return None
        return cls(name, engine.tokenizer, prompt_token_ids, req.include_reasoning)

    def adjust(self, params) -> None:
        """Markers that are special tokens must stay in the text to be found there."""
        if self.markers.keep_special_tokens:
            params.skip_special_tokens = False

    def split(self) -> ReasoningSplit:
        return ReasoningSplit(self.markers, self.phase)

    def fields(self, reasoning: Optional[str]) -> dict:
        return reasoning_fields(reasoning, self.include)


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
