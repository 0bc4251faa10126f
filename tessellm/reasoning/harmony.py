"""gpt-oss's harmony format: a model's output text as messages (channel, recipient, content).

The chat template ends the prompt with ``<|start|>assistant``; the model then writes one or
more messages, each a header, ``<|message|>``, the content and an end marker::

    <|channel|>analysis<|message|>Need the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>
    <|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>

    header  := [role] { "<|channel|>" CHANNEL | " to=" RECIPIENT | [" " | "<|constrain|>"] CONTENT_TYPE }
    end     := "<|end|>" (another message follows) | "<|call|>" | "<|return|>" (the turn ends)

The first message's ``<|start|>assistant`` is the prompt's; the recipient may come before the
channel (``<|start|>assistant to=functions.f<|channel|>commentary json<|message|>``, as the
chat template writes past calls). ``<|call|>`` and ``<|return|>`` are stop tokens, so the text
usually ends without them: an open message at the end of a finished output is complete.

The text is the output decoded with special tokens kept (the markers are single special tokens
of gpt-oss's tokenizer). ``HarmonyParser.parse(text, final)`` takes the whole output so far and
is incremental: complete messages are parsed once, the open one's content is searched only
where it grew. While not ``final``, a trailing piece that could start a marker (``"<|"``) is held
back from the open message's content, so content only grows from call to call.

Malformed output never raises: text outside any header (a model that forgets the format) is a
message with no channel; a header that never reaches ``<|message|>`` is dropped at the end;
a ``<|start|>`` inside a message's content ends that message.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from tessellm.reasoning.holdback import held_back

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
END, CALL, RETURN = "<|end|>", "<|call|>", "<|return|>"
ENDS = (END, CALL, RETURN, START)  # what ends a message's content (START: a malformed one)
HEADER_OPENERS = (CHANNEL, " to=", CONSTRAIN)  # how a header starts after the role (or without one)
MAX_HEADER = 256  # characters: a longer "header" is not one (its text is a channel-less message)


@dataclass
class HarmonyMessage:
    channel: Optional[str]  # "analysis", "commentary", "final", ...; None: text outside the format
    recipient: Optional[str]  # "functions.get_weather" for a tool call; None: to the user
    content_type: Optional[str]  # "json" (``<|constrain|>json``) or None
    content: str  # so far (without a held-back piece that may start a marker)
    done: bool  # its end marker was read (or the output ended)
    end: Optional[str] = None  # END, CALL or RETURN when read


def parse_header(header: str) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """``(channel, recipient, content_type)`` of the text between a message's role and
    ``<|message|>``: ``"<|channel|>commentary to=functions.f <|constrain|>json"``."""
    before, sep, after = header.replace(CONSTRAIN, " ").partition(CHANNEL)
    words_after = after.split()
    channel = words_after[0] if sep and words_after else None
    recipient = content_type = None
    for word in before.split() + words_after[1:]:
        if word.startswith("to="):
            recipient = recipient or word[3:] or None
        elif content_type is None:
            content_type = word
    return channel, recipient, content_type


def prompt_header(prompt_tail: str) -> Optional[tuple[Optional[str], Optional[str], Optional[str]]]:
    """The header a prompt opened the first message with, when it ends inside one (a template
    whose generation prompt is ``<|start|>assistant<|channel|>final<|message|>``); None when
    it ends before the header (``<|start|>assistant``, gpt-oss's own template)."""
    at = prompt_tail.rfind(START)
    segment = prompt_tail[at + len(START):] if at >= 0 else ""
    if at < 0 or not segment.endswith(MESSAGE) or any(m in segment for m in (END, CALL, RETURN)):
        return None
    header = segment[:-len(MESSAGE)]
    cut = [i for i in (header.find(o) for o in HEADER_OPENERS) if i >= 0]
    return parse_header(header[min(cut, default=len(header)):])


class HarmonyParser:
    """One output's messages, parsed as it grows (``parse`` with the whole text each time).
    ``opened``: the first message's header when the prompt wrote it (``prompt_header``)."""

    def __init__(self, opened: Optional[tuple] = None):
        self.opened = opened
        self._reset()

    def _reset(self) -> None:
        self._done: list[HarmonyMessage] = []  # complete messages
        self._next = 0  # where the text after them starts
        self._open: Optional[HarmonyMessage] = None  # the open message's header, once read
        if self.opened is not None:
            self._open = HarmonyMessage(*self.opened, content="", done=False)
        self._body = 0  # where the open message's content starts
        self._search = 0  # its content before this holds no end marker

    def parse(self, text: str, final: bool) -> list[HarmonyMessage]:
        if len(text) < max(self._next, self._search):
            self._reset()  # not the text seen before: start over
        while True:
            if self._open is None and not self._read_header(text, final):
                return list(self._done)
            message = self._read_content(text, final)
            if not message.done:
                return self._done + [replace(message)]  # a copy: the open one changes
            self._done.append(message)
            self._open = None

    # -- one message ---------------------------------------------------------------------
    def _read_header(self, text: str, final: bool) -> bool:
        """Read the next message's header; False when there is none (yet)."""
        pos = self._next
        after_start = text.startswith(START, pos)
        if after_start:
            pos += len(START)
        elif pos >= len(text) or (not final and any(m.startswith(text[pos:]) for m in (START, *HEADER_OPENERS))):
            return False  # nothing yet, or a marker is being written
        elif not text.startswith(HEADER_OPENERS, pos):
            return self._plain(text, pos)  # no header: text outside the format
        at = text.find(MESSAGE, pos, pos + MAX_HEADER + len(MESSAGE))
        header = text[pos:at if at >= 0 else len(text)]
        if any(m in header for m in ENDS) or (at < 0 and len(text) - pos > MAX_HEADER):
            return self._plain(text, self._next)  # not a header
        if at < 0:
            if final:
                self._next = len(text)  # an unfinished header at the end: nothing to show
            return False
        if after_start:  # the role ("assistant") comes first
            cut = [i for i in (header.find(o) for o in HEADER_OPENERS) if i >= 0]
            header = header[min(cut, default=len(header)):]
        self._open = HarmonyMessage(*parse_header(header), content="", done=False)
        self._body = self._search = at + len(MESSAGE)
        return True

    def _plain(self, text: str, pos: int) -> bool:
        """Text outside the format from ``pos``: a message without channel up to an end marker
        (a ``<|start|>`` it opens with is its text: the message it began was not one)."""
        self._open = HarmonyMessage(None, None, None, content="", done=False)
        self._body = pos
        self._search = pos + (len(START) if text.startswith(START, pos) else 0)
        return True

    def _read_content(self, text: str, final: bool) -> HarmonyMessage:
        message = self._open
        ends = [(i, m) for m in ENDS if (i := text.find(m, self._search)) >= 0]
        if ends:
            at, marker = min(ends)
            message.content = text[self._body:at]
            message.done = True
            if marker == START:  # a new message began without <|end|>: this one ended
                self._next = at
            else:
                message.end = marker
                self._next = at + len(marker)
            return message
        if final:
            message.content, message.done = text[self._body:], True
            self._next = len(text)
            return message
        longest = max(len(m) for m in ENDS)
        keep = len(text) - held_back(text[max(self._body, len(text) - longest):], ENDS)
        self._search = max(self._body, len(text) - longest + 1)
        message.content = text[self._body:keep]
        return message


FUNCTIONS = "functions."  # a recipient that names one of the request's tools


@dataclass
class HarmonyOutput:
    """Messages as an OpenAI chat message: each part is one message's content so far."""

    reasoning: list[str]  # analysis (and messages to recipients that are not functions)
    content: list[str]  # final, commentary preambles, text outside the format
    calls: list[tuple[str, str]]  # (function name, arguments so far)
    final: list[str]  # with ``split_final``: the final channel's texts (then not in content)


def to_openai(messages: list[HarmonyMessage], calls: bool = True, split_final: bool = False) -> HarmonyOutput:
    """Where each message goes. ``calls`` False (no tools, or tool_choice none): a message to a
    function is reasoning, not a call. ``split_final``: the final channel apart (a forced
    tool_choice reads its calls there)."""
    out = HarmonyOutput([], [], [], [])
    for m in messages:
        if m.recipient is not None and m.recipient.startswith(FUNCTIONS) and calls:
            out.calls.append((m.recipient[len(FUNCTIONS):], m.content))
        elif m.channel == "analysis" or m.recipient is not None:
            out.reasoning.append(m.content)
        elif split_final and m.channel == "final":
            out.final.append(m.content)
        elif m.channel is not None or m.content.strip():
            out.content.append(m.content)
    return out


def join(parts: list[str]) -> str:
    """Messages' texts joined by a newline (as vLLM joins reasoning messages); an empty one adds
    nothing (so a stream's text only grows as an open message fills)."""
    return "\n".join(p for p in parts if p)
