"""Steps scheduled whose results have not come back: the one record of what is in flight.

The scheduler adds each step it builds (``add``) and retires it when its results come back
(``retire``, oldest first); the engine core submits steps and collects the oldest in the same
order. Per request it answers what the steps in flight owe the request::

    request a:  9 tokens computed | step N: 1 token, samples (a placeholder p1)
                                  | step N+1: 1 token (p1 itself), samples p2
    tokens_ahead(a) = 2      scheduled tokens past num_computed_tokens
    samples_ahead(a) = 2     sampled tokens whose ids only the device knows yet
    num_steps(a) = 2         steps in flight that hold the request

A request preempted while in flight is ``drop``-ped: its results in those steps are discarded
when they come back, and it owes nothing any more (it is recomputed from its known tokens).
Plain Python, no torch. The model runner keeps its own view of the same steps in its process
(``step_pipeline.LaunchedSteps``: handles whose sampled ids the host has not read yet).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tessellm.core.step import SchedulerOutput


@dataclass
class InFlightStep:
    sched: SchedulerOutput
    dropped: set[str] = field(default_factory=set)  # preempted while it ran: results discarded


class InFlightSteps:
    def __init__(self):
        self.steps: deque[InFlightStep] = deque()
        # Per request, kept in step with ``steps`` (O(1) per request per step, as counters).
        self._tokens: dict[str, int] = {}
        self._samples: dict[str, int] = {}
        self._steps: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.steps)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._steps

    def tokens_ahead(self, request_id: str) -> int:
        return self._tokens.get(request_id, 0)

    def samples_ahead(self, request_id: str) -> int:
        return self._samples.get(request_id, 0)

    def num_steps(self, request_id: str) -> int:
        return self._steps.get(request_id, 0)

    def oldest(self) -> SchedulerOutput:
        return self.steps[0].sched

    def add(self, sched: SchedulerOutput) -> None:
        for rid, num in sched.num_scheduled_tokens.items():
            self._tokens[rid] = self._tokens.get(rid, 0) + num
            self._steps[rid] = self._steps.get(rid, 0) + 1
            if rid in sched.num_sampled_tokens:
                self._samples[rid] = self._samples.get(rid, 0) + 1
        self.steps.append(InFlightStep(sched))

    def retire(self, sched: SchedulerOutput) -> set[str]:
        """A step came back (the engine core retires the oldest; a benchmark that runs a step
        by hand may retire a later one); returns the requests whose results it must drop."""
        if self.steps and self.steps[0].sched is sched:
            step = self.steps.popleft()
        else:
            step = next((st for st in self.steps if st.sched is sched), None)
            if step is None:
                return set()  # an empty step was never in flight
            self.steps.remove(step)
        for rid, num in sched.num_scheduled_tokens.items():
            if rid not in step.dropped:
                self._forget(rid, num, rid in sched.num_sampled_tokens)
        return step.dropped

    def drop(self, request_id: str) -> None:
        """The request was preempted: discard its results in every step in flight."""
        for step in self.steps:
            if request_id in step.sched.num_scheduled_tokens:
                step.dropped.add(request_id)
        for counts in (self._tokens, self._samples, self._steps):
            counts.pop(request_id, None)

    def _forget(self, rid: str, num: int, sampled: bool) -> None:
        for counts, value in ((self._tokens, num), (self._steps, 1), (self._samples, int(sampled))):
            left = counts.get(rid, 0) - value
            if left > 0:
                counts[rid] = left
            else:
                counts.pop(rid, None)
