"""Background responses (``background: true``): answered at once, run on in the API process.

A background request is checked and submitted as any other (bad input is still a 400 before
anything runs), then its response is stored with status ``queued`` and an asyncio task takes
it through ``in_progress`` to its end (``completed`` / ``incomplete`` / ``failed``), stored
again as each turn is. ``POST /v1/responses/{id}/cancel`` cancels the task (its engine request
is aborted, its KV blocks freed) and stores it ``cancelled``. A client that goes away does not
stop it: that is what background is for.

Streamed (``stream: true`` too), the task records the events (``sse`` text) as it makes them;
the POST follows them from the first, ``GET /v1/responses/{id}?stream=true&starting_after=N``
from sequence number N + 1 (vLLM's resume), each follower on its own, until the run ends.

Runs live in the store (``ResponseStore.runs``) as long as their response does: a run's
events go when its response is evicted or deleted (a deletion cancels a run still going).
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable, Optional

logger = logging.getLogger(__name__)

KEEPALIVE = ": keep-alive\n\n"


class BackgroundRun:
    def __init__(self, response_id: str, streamed: bool):
        self.response_id = response_id
        self.streamed = streamed  # stream: true too: its events are recorded for followers
        self.events: list[str] = []  # SSE text of each event, in sequence_number order (streamed)
        self.changed = asyncio.Event()  # set on each new event and at the end
        self.done = False
        self.task: Optional[asyncio.Task] = None
        self._on_end: Optional[Callable[[], None]] = None
        self._work: Optional[Awaitable] = None

    def start(self, work: Awaitable, on_end: Optional[Callable[[], None]] = None) -> None:
        """Run ``work`` (a coroutine) as this run's task; ``on_end`` (its engine request's abort:
        idempotent, never awaits) runs once it ends, however it ends."""
        self._on_end, self._work = on_end, work
        self.task = asyncio.get_running_loop().create_task(self._run(work), name=f"background {self.response_id}")

    async def _run(self, work: Awaitable) -> None:
        try:
            await work
        except asyncio.CancelledError:
            pass  # cancel_responses: the caller stores it cancelled
        except Exception:  # noqa: BLE001 - the work stores its own failure; this is a bug's last word
            logger.exception("Background response %s failed", self.response_id)
        finally:
            self._end()

    def _end(self) -> None:
        """The run is over: its engine request freed, its followers told."""
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end()
        self._work = None
        self.done = True
        self.changed.set()

    async def record(self, events: AsyncIterator[str]) -> None:
        """Keep a stream's events (not its keep-alive comments) for the followers."""
        async for text in events:
            if text != KEEPALIVE:
                self.events.append(text)
                self.changed.set()

    async def follow(self, first: int = 0, heartbeat: Optional[float] = None) -> AsyncIterator[str]:
        """The recorded events from index ``first`` (= sequence number) on, as they come, until
        the run ends; a keep-alive comment after ``heartbeat`` seconds of silence."""
        i = first
        while True:
            self.changed.clear()
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.done:
                return
            try:
                await asyncio.wait_for(self.changed.wait(), heartbeat)
            except asyncio.TimeoutError:
                yield KEEPALIVE

    async def cancel(self) -> None:
        """Stop the task and wait for it to end (its engine request aborted on the way out)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if not self.done:  # cancelled before its first step: _run's body (and finally) never ran
            if asyncio.iscoroutine(self._work):
                self._work.close()  # never started: closed, not left "never awaited"
            self._end()

    @property
    def running(self) -> bool:
        return not self.done
