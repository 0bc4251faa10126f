"""MuseGlimmer's channels as reasoning and answer (vLLM's ``muse_glimmer`` reasoning parser).

The output is messages, each a header naming its recipient, a body and an end marker::

    to=self<|message|>Look it up first.<|eom|>
    to=weather.get<|message|><atem:function_calls>...<|eom|>
    to=user<|message|>It is sunny.<|eot|>

A header is ``[<|start|>assistant][to=RECIPIENT]<|message|>``; a body ends at ``<|eom|>`` or
``<|eot|>``, at the next header (a channel switch with no end marker, e.g. a thinking budget's
forced ``to=user<|message|>``) or at ``<|start|>``. The reasoning is the ``to=self`` bodies, joined
by newlines (vLLM's ``visible_channels``); the answer is the ``to=user`` bodies and the untagged
ones (a bare ``<|message|>``), joined. Bodies to any other recipient are tool calls (vLLM's
``muse_glimmer`` tool parser reads them; tessellm has none: they are in neither). Text between
messages is framing and dropped; text before the first header belongs to the channel the prompt
left open (vLLM's ``adjust_initial_state_from_prompt``: the recipient of the open message after
the prompt's last ``<|start|>assistant``), untagged (the answer) when none is open.

Whole or streamed, the same function of the text so far: while not final, a trailing piece that
could still be a marker or a header (`` to=us``) is held back, so both strings only grow.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from tessellm.reasoning.holdback import held_back

EOM, EOT, START, MESSAGE = "<|eom|>", "<|eot|>", "<|start|>", "<|message|>"
TURN = "<|start|>assistant"
SELF, USER = "self", "user"
HEADER = re.compile(r"(?:<\|start\|>\s*assistant)?[^\S\n]*(?:to=(?P<to>[A-Za-z0-9_.\-]+))?<\|message\|>")
ENDS = (EOM, EOT)
_MARKERS = (EOM, EOT, START, MESSAGE)
_HEADER_TAIL = re.compile(r"[^\S\n]*(?:t|to|to=[A-Za-z0-9_.\-]*)?$")  # could still become a header
UNTAGGED = ""  # a body with no recipient: the answer


def initial_recipient(prompt_tail: str) -> Optional[str]:
    """The recipient of the message the prompt leaves open after its last
    ``<|start|>assistant`` (``UNTAGGED`` for a bare ``<|message|>``); None when none is open."""
    at = prompt_tail.rfind(TURN)
    turn = prompt_tail[at + len(TURN):] if at >= 0 else prompt_tail
    pos = 0
    while (header := HEADER.search(turn, pos)) is not None:
        _, nxt = _body_end(turn, header.end())
        if nxt is None:
            return header.group("to") or UNTAGGED
        pos = nxt
    return None


def _body_end(text: str, start: int) -> tuple[int, Optional[int]]:
    """Where the body from ``start`` ends and where the next message search resumes (None:
    the body is still open at the end of the text)."""
    ends = [(i, i + len(m)) for m in ENDS if (i := text.find(m, start)) >= 0]
    header = HEADER.search(text, start)
    if header is not None:
        ends.append((header.start(), header.start()))
    cut = text.find(START, start)
    if cut >= 0:
        ends.append((cut, cut))
    if not ends:
        return len(text), None
    return min(ends)


class GlimmerSplit:
    """``split(text, token_ids, final) -> (reasoning, answer)``, as ``ReasoningSplit``; reasoning
    None when the output has no ``to=self`` body."""

    def __init__(self, recipient: Optional[str] = None):
        self.recipient = recipient  # the channel the output starts in (None: between messages)

    def split(self, text: str, token_ids: Sequence[int] = (), final: bool = True) -> tuple[Optional[str], str]:
        thoughts: list[str] = []
        answer: list[str] = []
        recipient = UNTAGGED if self.recipient is None else self.recipient
        pos = 0
        while True:
            end, nxt = _body_end(text, pos)
            body = text[pos:end]
            if nxt is None and not final:  # the open body: hold back what may still be framing
                body = _safe_tail(body)
            if recipient == SELF:
                thoughts.append(body)
            elif recipient in (USER, UNTAGGED):
                answer.append(body)
            if nxt is None:
                break
            header = HEADER.search(text, nxt)
            if header is None:
                break  # only framing (or a header still arriving) is left
            recipient, pos = header.group("to") or UNTAGGED, header.end()
        return ("\n".join(thoughts) if thoughts else None), "".join(answer)


def _safe_tail(body: str) -> str:
    """``body`` less a trailing piece that could still become a marker or a header."""
    while True:
        trimmed = body[:len(body) - held_back(body, _MARKERS)]
        tail = _HEADER_TAIL.search(trimmed)
        if tail is not None:
            trimmed = trimmed[:tail.start()]
        if trimmed == body:
            return body
        body = trimmed
