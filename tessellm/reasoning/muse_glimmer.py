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

Linear: no regular expression that backtracks over a run of spaces (the header pattern did:
8,000 spaces took seconds); a header is read back from its ``<|message|>``. A split kept across
a stream's calls settles what it read and reads only the text after it: the new characters,
the longest marker's length back, the held-back piece and, when a ``<|message|>`` arrives, its
header.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from tessellm.reasoning.holdback import held_back
from tessellm.reasoning.scan import Growing, Joined, Occurrences

EOM, EOT, START, MESSAGE = "<|eom|>", "<|eot|>", "<|start|>", "<|message|>"
TURN = "<|start|>assistant"
SELF, USER = "self", "user"
ENDS = (EOM, EOT)
_MARKERS = (EOM, EOT, START, MESSAGE)
LONGEST = max(map(len, _MARKERS))
_NAME = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")  # a recipient's characters
# could still become a header; the look-behind starts a try only after a non-blank (linear)
_HEADER_TAIL = re.compile(r"(?<![^\S\n])[^\S\n]*(?:t|to|to=[A-Za-z0-9_.\-]*)?$")
UNTAGGED = ""  # a body with no recipient: the answer


def initial_recipient(prompt_tail: str) -> Optional[str]:
    """The recipient of the message the prompt leaves open after its last
    ``<|start|>assistant`` (``UNTAGGED`` for a bare ``<|message|>``); None when none is open."""
    at = prompt_tail.rfind(TURN)
    turn = prompt_tail[at + len(TURN):] if at >= 0 else prompt_tail
    found, pos = Occurrences(turn, _MARKERS), 0
    while (at := found.next(pos, (MESSAGE,))[0]) >= 0:  # a header: its body runs to its end
        recipient, body = _header_start(turn, pos, at)[1] or UNTAGGED, at + len(MESSAGE)
        end, marker = found.next(body, _MARKERS)
        if end < 0:
            return recipient
        pos = end + len(marker) if marker in ENDS else _header_start(turn, body, end)[0] if marker == MESSAGE else end
    return None


def _header_start(text: str, lo: int, at: int) -> tuple[int, Optional[str]]:
    """The header that ends with the ``<|message|>`` at ``at``: where it starts (the first
    ``p >= lo`` with ``text[p:at]`` a ``[<|start|>assistant][blanks][to=RECIPIENT]``) and its
    recipient (None: none). Reads back over the header only::

        ...<|start|>assistant to=weather.get<|message|>
           ^ start             ^ to=       ^ at
    """
    i = at
    while i > lo and text[i - 1] in _NAME:
        i -= 1
    recipient, p = None, at
    if i < at and i - 3 >= lo and text.startswith("to=", i - 3):
        recipient, p = text[i:at], i - 3
    while p > lo and text[p - 1] != "\n" and text[p - 1].isspace():
        p -= 1
    role = p - len("assistant")
    if role >= lo and text.startswith("assistant", role):
        while role > lo and text[role - 1].isspace():
            role -= 1
        if role - len(START) >= lo and text.startswith(START, role - len(START)):
            p = role - len(START)
    return p, recipient


class GlimmerSplit:
    """``split(text, token_ids, final) -> (reasoning, answer)``, as ``ReasoningSplit``; reasoning
    None when the output has no ``to=self`` body. Kept per streamed choice: each call reads only
    the text no earlier call settled (``scan.Growing``)."""

    def __init__(self, recipient: Optional[str] = None):
        self.recipient = recipient  # the channel the output starts in (None: between messages)
        self._reset()

    def _reset(self) -> None:
        self._read = Growing(LONGEST)  # in a body, its text before ``_read.pos`` is settled
        self._searched = 0  # no marker starts before this that was not found
        self._channel: Optional[str] = None  # the open body's recipient; None: between messages
        self._after = 0  # between messages: where the search for the next header starts
        self._thoughts, self._selves = Joined(), 0  # the to=self bodies, joined by newlines; how many
        self._answer = Joined()
        self._open(UNTAGGED if self.recipient is None else self.recipient)

    def _open(self, recipient: str) -> None:
        self._channel = recipient
        if recipient == SELF:
            self._thoughts.add("\n" if self._selves else "")
            self._selves += 1

    def split(self, text: str, token_ids: Sequence[int] = (), final: bool = True) -> tuple[Optional[str], str]:
        if not self._read.continues(text):
            self._reset()  # not the text seen before, grown: start over
        pos, searched = self._read.pos, self._searched
        found = Occurrences(text, _MARKERS)
        while True:
            if self._channel is None:  # between messages: framing up to the next header
                at, _ = found.next(max(self._after, searched), (MESSAGE,))
                if at < 0:
                    pos = searched = max(self._after, len(text) - LONGEST + 1)
                    break
                pos = searched = at + len(MESSAGE)
                self._open(_header_start(text, self._after, at)[1] or UNTAGGED)
                continue
            at, marker = found.next(searched, _MARKERS)
            if at < 0:
                break
            end, recipient = _header_start(text, pos, at) if marker == MESSAGE else (at, None)
            self._add(text[pos:end])
            if marker == MESSAGE:  # the body ended at the next header: that body opens
                pos = searched = at + len(MESSAGE)
                self._open(recipient or UNTAGGED)
            else:
                self._channel, self._after = None, at + len(marker) if marker in ENDS else at
        rest = ""
        if self._channel is not None:  # the open body: settled up to what may still be framing
            searched = max(pos, len(text) - LONGEST + 1)
            cut = pos + len(_safe_tail(text[pos:]))
            self._add(text[pos:cut])
            pos, rest = cut, text[cut:] if final else ""
        self._read.settle(text, pos)
        self._searched = searched
        return self._result(rest)

    def _add(self, piece: str) -> None:
        if self._channel == SELF:
            self._thoughts.add(piece)
        elif self._channel in (USER, UNTAGGED):
            self._answer.add(piece)

    def _result(self, rest: str) -> tuple[Optional[str], str]:
        """The settled strings with the open body's unsettled ``rest`` (final: all of it)."""
        reasoning = self._thoughts.text() if self._selves else None
        answer = self._answer.text()
        if self._channel == SELF:
            reasoning += rest
        elif self._channel in (USER, UNTAGGED):
            answer += rest
        return reasoning, answer


def _safe_tail(body: str) -> str:
    """``body`` less a trailing piece that could still become a marker or a header: the start
    of a marker at its end, then a header's start before that (`` to=us`` of `` to=user<|me``).
    Once each: what lies before cannot become either (``"to=to="``: only the last ``to=`` may
    still be a header; trimming again and again held all of it back, in quadratic time)."""
    trimmed = body[:len(body) - held_back(body, _MARKERS)]
    tail = _HEADER_TAIL.search(trimmed)
    return trimmed[:tail.start()] if tail is not None else trimmed
