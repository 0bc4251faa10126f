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
"""

from __future__ import annotations

from typing import Optional, Sequence

from tessellm.reasoning.holdback import held_back

MODEL = "<|message_model|>"
THINK, TEXT, CALL = "<|content_thinking|>", "<|content_text|>", "<|content_invoke_tool_json|>"
TOOL_TEXTS = ("<|content_invoke_tool_text|>", "<|content_tool_error|>")  # rendered as text
ENDS = ("<|end_message|>", "<|content_model_end_sampling|>")
MARKERS = (MODEL, THINK, TEXT, CALL, *TOOL_TEXTS, *ENDS)
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
    None when the output has no thinking block. Each call reads the text from its start (one
    ``find`` per marker kind and block)."""

    def __init__(self, state: str = HEADER, keep_blocks: bool = False):
        self.state = state
        self.keep_blocks = keep_blocks

    def split(self, text: str, token_ids: Sequence[int] = (), final: bool = True) -> tuple[Optional[str], str]:
        thoughts: list[str] = []  # the closed thinking blocks' texts
        answer: list[str] = []
        state, pos = self.state, 0
        block = "" if state == THINKING else None  # the open thinking block's text
        while True:
            at, marker = _first(text, pos, IN_THINKING if state == THINKING else MARKERS)
            piece = text[pos:at] if at >= 0 else text[pos:]
            if at < 0 and not final:
                piece = piece[:len(piece) - held_back(piece, MARKERS)]
            if state == THINKING:
                block += piece
            elif state != HEADER or self.keep_blocks:
                answer.append(piece)
            if at < 0:
                break
            nxt = _next_state(state, marker)
            if self.keep_blocks and marker != THINK and not (state == THINKING and marker in ENDS):
                answer.append(marker)  # the tool parser reads every block but the thinking
            if state == THINKING and nxt != THINKING:
                thoughts.append(block.rstrip())
                block = None
            elif nxt == THINKING and state != THINKING:
                block = ""
            state, pos = nxt, at + len(marker)
        if block is not None:
            thoughts.append(block.rstrip())
        content = "".join(answer)
        if not self.keep_blocks and not content.strip():
            content = ""
        return ("".join(thoughts) if thoughts else None), content


IN_THINKING = (THINK, CALL, *ENDS)  # the markers that mean anything inside a thinking block


def _first(text: str, pos: int, markers: Sequence[str]) -> tuple[int, str]:
    """``(where, which)`` of the first of ``markers`` at or after ``pos``; (-1, "") for none."""
    return min(((i, m) for m in markers if (i := text.find(m, pos)) >= 0), default=(-1, ""))
