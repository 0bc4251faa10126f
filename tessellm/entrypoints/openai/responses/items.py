"""Output items of a response, built from the chat path's pieces (reasoning text, answer text,
tool-call pieces) in the order they come, with the stream events that announce them.

One builder serves both paths: a whole response feeds the finished message in one go (its
reasoning, then its text, then its calls) and keeps only the items; a stream sends every event.
So the items a stream ends with are the items the same request gets unstreamed.

Event order per item (each event carries ``sequence_number``, counted by the caller):

    output_item.added                       (item status in_progress, empty)
      content_part.added                    (message: output_text; reasoning: reasoning_text)
        output_text.delta | reasoning_text.delta | function_call_arguments.delta   (repeated)
        output_text.done  | reasoning_text.done  | function_call_arguments.done
      content_part.done
    output_item.done                        (item status completed, or incomplete when cut)

An item stays open until an item of another kind starts or the output ends; a call's argument
pieces may arrive after the next call has started, so open calls close together.
"""

from __future__ import annotations

import secrets
from typing import Optional

from tessellm.entrypoints.openai.responses.protocol import (FunctionCallItem, MessageItem, OutputItem,
                                                            OutputText, ReasoningItem, ReasoningText)

Event = dict


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


class ItemBuilder:
    def __init__(self):
        self.items: list[OutputItem] = []
        self._open: list[int] = []  # positions in items of the open item(s): one, or several calls
        self._calls: dict[int, int] = {}  # the chat path's call index -> position in items

    # -- pieces in -------------------------------------------------------------------------

    def reasoning(self, text: str) -> list[Event]:
        return self._content(ReasoningItem, "rs", ReasoningText, "response.reasoning_text.delta", text)

    def text(self, text: str, logprobs: list = ()) -> list[Event]:
        """``logprobs``: the tokens' entries (include message.output_text.logprobs); a piece with
        logprobs and no text yet (held back: a stop string may be starting) is a delta of ""."""
        events = self._content(MessageItem, "msg", OutputText, "response.output_text.delta", text,
                               logprobs=list(logprobs))
        if logprobs:
            self.items[self._open[0]].content[0].logprobs += logprobs
        return events

    def _content(self, kind: type, prefix: str, part: type, delta: str, text: str, **extra) -> list[Event]:
        """``text`` appended to the open item of ``kind`` (one content part), opened if need be."""
        events = self._switch(kind)
        if not self._open:
            item = kind(id=item_id(prefix), status="in_progress")
            events += self._add(item, part(text=""))
            item.content.append(part(text=""))
        if not text and not extra.get("logprobs"):  # opened only (an empty answer)
            return events
        pos = self._open[0]
        self.items[pos].content[0].text += text
        return events + [self._ev(delta, pos, content_index=0, delta=text, **extra)]

    def call(self, index: int, call_id: Optional[str], name: Optional[str], arguments: str) -> list[Event]:
        """A tool-call piece of the chat path: the first of call ``index`` has its id and name."""
        events: list[Event] = []
        if index not in self._calls:
            events += self._switch(FunctionCallItem)
            item = FunctionCallItem(id=item_id("fc"), call_id=call_id or item_id("call"), name=name or "",
                                    status="in_progress")
            events += self._add(item, None)
            self._calls[index] = self._open[-1]
        pos = self._calls[index]
        if arguments:
            self.items[pos].arguments += arguments
            events.append(self._ev("response.function_call_arguments.delta", pos, delta=arguments))
        return events

    def close(self, status: str = "completed") -> list[Event]:
        """Close the open item(s); ``status`` "incomplete" when the output was cut."""
        events = []
        for pos in self._open:
            item = self.items[pos]
            item.status = status
            if isinstance(item, FunctionCallItem):
                events.append(self._ev("response.function_call_arguments.done", pos, arguments=item.arguments))
            else:
                part = item.content[0]
                if isinstance(item, MessageItem):
                    events.append(self._ev("response.output_text.done", pos, content_index=0, text=part.text,
                                           logprobs=part.logprobs))
                else:
                    events.append(self._ev("response.reasoning_text.done", pos, content_index=0, text=part.text))
                events.append(self._ev("response.content_part.done", pos, content_index=0,
                                       part=part.model_dump()))
            events.append({"type": "response.output_item.done", "output_index": pos, "item": item.model_dump()})
        self._open = []
        return events

    def finish(self, status: str) -> list[Event]:
        """The end of the output: an empty message if nothing came, then everything closed."""
        events = self.text("") if not self.items else []
        return events + self.close(status)

    # -- helpers ---------------------------------------------------------------------------

    def _switch(self, kind: type) -> list[Event]:
        """Close the open item unless it is of ``kind`` (calls: every open one is a call)."""
        if self._open and not isinstance(self.items[self._open[0]], kind):
            return self.close()
        return []

    def _add(self, item: OutputItem, part) -> list[Event]:
        self.items.append(item)
        pos = len(self.items) - 1
        self._open.append(pos)
        events = [{"type": "response.output_item.added", "output_index": pos, "item": item.model_dump()}]
        if part is not None:
            events.append(self._ev("response.content_part.added", pos, content_index=0, part=part.model_dump()))
        return events

    def _ev(self, kind: str, pos: int, **fields) -> Event:
        return {"type": kind, "item_id": self.items[pos].id, "output_index": pos, **fields}
