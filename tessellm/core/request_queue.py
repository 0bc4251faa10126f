"""The scheduler's waiting queue, in the order of its scheduling policy (vLLM's
``--scheduling-policy``).

* ``fcfs`` (``FCFSQueue``): a deque, arrival order; a preempted or skipped request goes back to
  the front. No ordering work per step.
* ``priority`` (``PriorityQueue``): a heap on ``(priority, arrival_time)``, lower first (vLLM's
  rule); a preempted or skipped request goes back into the heap, so it comes out again in its
  place. Pushing and popping cost O(log n); removing one (an abort) O(n).

Both hold ``Request`` objects and offer the same operations; iteration order is the queue's
order for ``FCFSQueue`` and unspecified for ``PriorityQueue`` (``reversed`` gives the last to be
served first, for both).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Iterable, Iterator

from tessellm.core.request import Request

def priority_key(req: Request) -> tuple:
    """The priority policy's order: lower ``priority`` first, then earlier arrival."""
    return req.priority, req.arrival_time


class FCFSQueue(deque):
    """First come, first served."""

    add = deque.append  # a new request: at the back
    take = deque.popleft  # the next one to admit
    requeue = deque.appendleft  # a preempted request: at the front

    def requeue_all(self, reqs: list[Request]) -> None:
        """Requests taken and not admitted, put back in front in their order."""
        self.extendleft(reversed(reqs))


class PriorityQueue:
    """By ``priority_key``; entries are ``(priority, arrival_time, seq, request)`` (``seq``
    breaks ties, so requests themselves are never compared)."""

    def __init__(self) -> None:
        self._heap: list[tuple] = []
        self._seq = itertools.count()

    def add(self, req: Request) -> None:
        heapq.heappush(self._heap, (req.priority, req.arrival_time, next(self._seq), req))

    requeue = add

    def requeue_all(self, reqs: Iterable[Request]) -> None:
        for req in reqs:
            self.add(req)

    def take(self) -> Request:
        return heapq.heappop(self._heap)[-1]

    def remove(self, req: Request) -> None:
        for i, entry in enumerate(self._heap):
            if entry[-1] is req:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return
        raise ValueError(f"{req!r} is not waiting.")

    def __contains__(self, req: object) -> bool:
        return any(entry[-1] is req for entry in self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[-1] for entry in self._heap)

    def __reversed__(self) -> Iterator[Request]:
        return (entry[-1] for entry in sorted(self._heap, reverse=True))

    def __len__(self) -> int:
        return len(self._heap)


def check_policy(policy: str) -> None:
    """``scheduling_policy`` is "fcfs" or "priority"; else one ValueError naming it."""
    if policy not in ("fcfs", "priority"):
        raise ValueError(f"scheduling_policy {policy!r} is not supported; use fcfs (first come, "
                         "first served) or priority (lower priority value first).")


def make_queue(policy: str):
    """The waiting queue for ``policy`` ("fcfs" or "priority")."""
    check_policy(policy)
    return PriorityQueue() if policy == "priority" else FCFSQueue()
