"""Responses kept in memory for ``previous_response_id`` and ``GET /v1/responses/{id}``
(``--responses-store-size N``; 0, the default, keeps none).

Each stored response keeps only its own turn: the input items it was sent, the response body,
and the id of the response it continued. A conversation is rebuilt by walking those links back
(so a chain of n turns costs n turns of memory, not n^2). The store holds at most ``capacity``
responses; the least recently used one is dropped first (never a background response still
running: the store holds more than ``capacity`` while such runs go on), and a chain whose
earlier turn was dropped is answered with a 400 that says so. Lives in the API process, per server: lost on
restart, not shared between replicas.

A failed response (a stream that ended in ``response.failed``) is stored, so GET answers it,
but it continues nothing: its items are partial. Named as ``previous_response_id`` it is a 400
that names it and the turn to retry from, the last completed one (the response it continued).
So is a cancelled background response; one still queued or in progress is a 400 that says to
wait for it. ``runs``: the background responses' runs (background.py), kept with their response.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from tessellm.entrypoints.openai.errors import bad_request

if TYPE_CHECKING:
    from tessellm.entrypoints.openai.responses.background import BackgroundRun


@dataclass
class StoredResponse:
    input_items: list[dict]  # this turn's input items (a string input as one user message)
    response: dict  # the response body as sent
    previous_id: Optional[str]  # the response this one continued


class ResponseStore:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self.runs: dict[str, "BackgroundRun"] = {}  # background responses (background.py)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def put(self, response_id: str, stored: StoredResponse) -> None:
        if not self.enabled:
            return
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            # the least recently used one that is not a background response still running (that
            # one stays readable, cancellable and deletable until it ends; over capacity meanwhile)
            old = next((rid for rid in self._items if not self._running(rid)), None)
            if old is None:
                break
            del self._items[old]
            self.runs.pop(old, None)

    def _running(self, response_id: str) -> bool:
        run = self.runs.get(response_id)
        return run is not None and run.running

    def get(self, response_id: str) -> Optional[StoredResponse]:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        """Forget it (the caller cancels its run first, if one is going)."""
        self.runs.pop(response_id, None)
        return self._items.pop(response_id, None) is not None

    def history(self, previous_id: str) -> list[dict]:
        """The conversation up to and including ``previous_id``'s output, as input items."""
        if not self.enabled:
            raise bad_request("previous_response_id needs stored responses, and this server keeps none: "
                              "start it with --responses-store-size N, or send the earlier turn's output "
                              "items (and your function_call_output items) in input.", "previous_response_id",
                              "unsupported_parameter")
        turns, seen, rid = [], set(), previous_id
        while rid is not None:
            stored = self.get(rid)
            if stored is None or rid in seen:
                which = "was" if rid == previous_id else f"continues {rid!r}, which was"
                raise bad_request(f"Previous response {previous_id!r} {which} not found (never stored, "
                                  "deleted, or dropped: this server keeps the last "
                                  f"{self.capacity} responses, each on the replica that made it); send the "
                                  "conversation in input instead.",
                                  "previous_response_id", "previous_response_not_found")
            seen.add(rid)
            status = stored.response.get("status")
            if status in ("queued", "in_progress"):
                raise bad_request(f"Previous response {rid!r} is a background response still {status.replace('_', ' ')}; "
                                  f"wait until GET /v1/responses/{rid} says it has completed, then continue it.",
                                  "previous_response_id", "previous_response_in_progress")
            if status in ("failed", "cancelled"):
                raise _failed_previous(rid, stored, stored.previous_id in self._items)
            turns.append(stored)
            rid = stored.previous_id
        items: list[dict] = []
        for stored in reversed(turns):
            items += stored.input_items + stored.response.get("output", [])
        return items


def _failed_previous(response_id: str, stored: StoredResponse, continued_kept: bool):
    """The 400 for continuing a failed response: its output is what came before the failure.
    ``continued_kept``: the response it continued is still stored (one to retry from)."""
    error = (stored.response.get("error") or {}).get("message")
    why = f" ({error})" if error else ""
    status = stored.response.get("status", "failed")
    if stored.previous_id is None:
        retry = "send that turn again without previous_response_id"
    elif continued_kept:
        retry = (f"continue from the last completed response, {stored.previous_id!r} (the one it "
                 "continued), to retry that turn")
    else:
        retry = (f"the response it continued, {stored.previous_id!r}, is no longer stored: send the "
                 "conversation in input")
    return bad_request(f"Previous response {response_id!r} {'was cancelled' if status == 'cancelled' else 'failed'}"
                       f"{why}: its output is partial and cannot be continued; {retry}.", "previous_response_id",
                       "previous_response_failed")
