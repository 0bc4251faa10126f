"""A streamed request's output so far, kept from its DELTA outputs.

The server asks the engine for ``RequestOutputKind.DELTA`` on streams (each output holds only
what is new since the one before: text, token ids, logprobs; prompt logprobs in the first only)
and for ``FINAL_ONLY`` on requests it answers whole (one output, at the end), as vLLM's server
does: per step the API process handles the new tokens only, never a copy of everything so far.

A stream renderer sends each delta as it is. What it needs of the whole output it keeps here:
the tool-call, reasoning and harmony parsers read the whole text, ``continuous_usage_stats``
counts every token, and the last chunk's usage (and ``--enable-log-outputs``) wants the
finished output. Keeping it costs O(new tokens) a step: token ids are extended in place, text
pieces are joined only when the text is read (once per step at most, by a parser).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from tessellm.core.outputs import CompletionOutput, RequestOutput


class ChoiceSoFar:
    """One sample's text and token ids so far, and how its latest output left it."""

    __slots__ = ("token_ids", "_parts", "latest")

    def __init__(self):
        self.token_ids: list[int] = []
        self._parts: list[str] = []
        self.latest: Optional[CompletionOutput] = None  # its newest delta

    def add(self, co: CompletionOutput) -> None:
        self.token_ids.extend(co.token_ids)
        if co.text:
            self._parts.append(co.text)
        self.latest = co

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def output(self) -> CompletionOutput:
        """The whole sample as a cumulative output holds it, minus the per-token logprobs (no
        reader of this needs them: the chunks carried them)."""
        return replace(self.latest, text=self.text, token_ids=list(self.token_ids), logprobs=None)


class RequestSoFar:
    """One engine request (one prompt, its n samples) folded from its DELTA outputs."""

    def __init__(self):
        self.latest: Optional[RequestOutput] = None
        self.prompt_logprobs = None  # from the first output that had them (DELTA: the first)
        self.choices: dict[int, ChoiceSoFar] = {}

    def add(self, out: RequestOutput) -> None:
        self.keep_prompt_logprobs(out)
        self.latest = out
        for co in out.outputs:
            self.choice(co.index).add(co)

    def keep_prompt_logprobs(self, out: RequestOutput) -> None:
        if self.prompt_logprobs is None:
            self.prompt_logprobs = out.prompt_logprobs

    def choice(self, index: int) -> ChoiceSoFar:
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = ChoiceSoFar()
        return choice

    @property
    def finished(self) -> bool:
        return self.latest is not None and self.latest.finished

    def output(self) -> RequestOutput:
        """The whole request as a cumulative output holds it (usage, logging, /v1/responses)."""
        outputs = [self.choices[i].output() for i in sorted(self.choices)]
        return replace(self.latest, outputs=outputs, prompt_logprobs=self.prompt_logprobs)
