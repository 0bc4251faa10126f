"""Inkling's typed message blocks as reasoning and answer (vLLM's ``inkling`` reasoning parser).

Every marker is a special token (kept in the text for the request)::

    <|message_model|><|content_thinking|>I should look it up.<|end_message|>
    <|message_model|><|content_text|>Let me check.<|end_message|>
    <|message_model|><|content_invoke_tool_json|>{"name": "get_weather", "args": {"city": "SF"}}<|end_message|>

Blocks come in any order and any number; ``<|content_model_end_sampling|>`` may end one instead
of ``<|end_message|>``. After ``<|message_model|>`` a header (an optional function name) runs to
the block's kind marker and is neither reasoning nor answer. The reasoning is the thinking
blocks' texts, one after the other, each without its trailing whitespace (vLLM's
``strip_trailing_reasoning_whitespace``); a thinking block left open ends at a JSON tool block's
marker (vLLM's defensive transition); other markers inside it are its text.

The answer, two ways (``InklingSplit(keep_blocks=...)``):

- for the ``inkling`` tool parser (``keep_blocks``): the text less the thinking blocks (their
  kind marker, text and end marker), every other block as written, which that parser reads;
- without one: the text blocks' texts, and the tool blocks' (JSON, raw and error) as text,
  markers and headers dropped; only whitespace: "" (as the tool parser's content).

Where the output starts comes from the prompt (vLLM's ``adjust_initial_state_from_prompt``): the
last of its Inkling markers decides, ``<|content_thinking|>`` in a thinking block,
``<|content_text|>`` in a text block, anything else in a header (the template ends the prompt
with ``<|message_model|>``).

Whole or streamed, the same function of the text so far: while not final, a trailing piece that
could start a marker is held back, so both strings only grow.

Linear: a split kept across a stream's calls settles what it read (the blocks' texts so far, the
state after the last marker) and reads only the text after it: the new characters and the
longest marker's length back (a marker split across deltas). Settled::

    ...<|end_message|><|message_model|><|content_text|>Let me ch|eck.<|end_mes
                                                               ^ pos: settled before, read after
"""

from __future__ import annotations

from typing import Optional, Sequence

from tessellm.reasoning.holdback import held_back
from tessellm.reasoning.scan import Growing, Joined

MODEL = "<|message_model|>"
THINK, TEXT, CALL = "<|content_thinking|>", "<|content_text|>", "<|content_invoke_tool_json|>"
TOOL_TEXTS = ("<|content_invoke_tool_text|>", "<|content_tool_error|>")  # rendered as text
ENDS = ("<|end_message|>", "<|content_model_end_sampling|>")
MARKERS = (MODEL, THINK, TEXT, CALL, *TOOL_TEXTS, *ENDS)
LONGEST = max(map(len, MARKERS))
HEADER, CONTENT, THINKING, TOOL = "header", "content", "thinking", "tool"


def initial_state(prompt_tail: str) -> str:
    """The state the output starts in, from the end of the prompt's text (special tokens kept)."""
    at, marker = max((prompt_tail.rfind(m), m) for m in MARKERS)
    if at < 0:
        return HEADER
    return THINKING if marker == THINK else CONTENT if marker == TEXT else HEADER


def _next_state(state: str, marker: str) -> str:
    if state == THINKING:
        return CONTENT if marker in ENDS else TOOL if marker == CALL else THINKING
    if marker in ENDS:
        return CONTENT
    if marker == MODEL:
        return HEADER
    return {THINK: THINKING, CALL: TOOL}.get(marker, CONTENT)  # text, raw tool, tool error: content


class InklingSplit:
    """``split(text, token_ids, final) -> (reasoning, answer)``, as ``ReasoningSplit``; reasoning
    None when the output has no thinking block. Kept per streamed choice: each call reads only
    the text no earlier call settled (``scan.Growing``)."""

    def __init__(self, state: str = HEADER, keep_blocks: bool = False):
        self.state = state  # where the output starts
        self.keep_blocks = keep_blocks
        self._reset()

    def _reset(self) -> None:
        self._read = Growing(LONGEST)  # the text before ``_read.pos`` is settled
        self._state = self.state  # the state at ``_read.pos``
        self._thoughts = Joined()  # the closed thinking blocks' texts, each less trailing whitespace
        self._block = Joined() if self.state == THINKING else None  # the open thinking block's text
        self._any = self.state == THINKING  # a thinking block was opened: reasoning is not None
        self._answer = Joined()

    def split(self, text: str, token_ids: Sequence[int] = (), final: bool = True) -> tuple[Optional[str], str]:
        if not self._read.continues(text):
            self._reset()  # not the text seen before, grown: start over
        state, pos, settled = self._read.walk(text, self._state, MARKERS, _markers_in, self._step)
        self._add(state, text[pos:settled])
        self._state = state
        self._read.settle(text, settled)
        rest = text[settled:]
        if not final:
            rest = rest[:len(rest) - held_back(rest, MARKERS)]
        return self._result(state, rest)

    def _step(self, state: str, piece: str, marker: str) -> str:
        """The block (or header) in ``state`` ends with ``piece`` at ``marker``: the state after."""
        self._add(state, piece)
        nxt = _next_state(state, marker)
        if self.keep_blocks and marker != THINK and not (state == THINKING and marker in ENDS):
            self._answer.add(marker)  # the tool parser reads every block but the thinking
        if state == THINKING and nxt != THINKING:
            self._thoughts.add(self._block.text()[:self._block.kept])
            self._block = None
        elif nxt == THINKING and state != THINKING:
            self._block, self._any = Joined(), True
        return nxt

    def _add(self, state: str, piece: str) -> None:
        if state == THINKING:
            self._block.add(piece)
        elif state != HEADER or self.keep_blocks:
            self._answer.add(piece)

    def _result(self, state: str, rest: str) -> tuple[Optional[str], str]:
        """The settled strings with the unsettled ``rest`` (in ``state``) after them."""
        reasoning = self._thoughts.text() if self._any else None
        if self._block is not None:  # open: its text less trailing whitespace
            block, kept = self._block.text(), rest.rstrip()
            reasoning += block + kept if kept else block[:self._block.kept]
        content, blank = self._answer.text(), self._answer.blank
        if state != THINKING and (state != HEADER or self.keep_blocks):
            content, blank = content + rest, blank and not rest.strip()
        if not self.keep_blocks and blank:
            content = ""
        return reasoning, content


IN_THINKING = (THINK, CALL, *ENDS)  # the markers that mean anything inside a thinking block


def _markers_in(state: str) -> Sequence[str]:
    return IN_THINKING if state == THINKING else MARKERS
