"""The runner's step pipeline: host-to-device staging, sampled-id readback, launched steps.

Steps run asynchronously: a launch returns a ``StepHandle`` at once; the sampled ids reach the
host through a pinned buffer and an event, read by ``StepHandle.result()``. Under async
scheduling the next step launches before that: a request's input token may be one the device
sampled but the host has not seen, fed from the previous step's sampled ids on the device::

    step N:    ... sample -> ids_N (device) --copy--> pinned host buffer, event
    step N+1:  input_ids = host ids, with rows of pending tokens <- ids_N[row in N]
               (launched while N runs); then N's handle resolves (event wait, no stream sync)

Host syncs, each on purpose: ``Staging.buffer`` waits for the event of the launch two steps
back before reusing its pinned set (already done by then in steady state); ``resolve`` waits for
a step's readback event (that is its job); ``LaunchedSteps.input_token`` resolves everything in
flight when a pending token is not the last step's (never expected; the scheduler runs one step
ahead at most); penalties resolve every step first (they read the whole history on the host).
"""

from __future__ import annotations

import collections
from typing import Callable, Optional

import numpy as np
import torch

from tessellm.core.input_batch import RunnerRequest
from tessellm.core.sampler import SamplerOutput
from tessellm.core.step import ModelRunnerOutput


class Staging:
    """Host arrays -> device tensors through pinned buffers kept per input slot (pinning a fresh
    buffer costs a cudaHostAlloc, ~40 us, every step). Two sets alternate by launch; a set is
    written again only after the event recorded behind its previous launch's copies completed."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}
        self._events: dict[int, object] = {}
        self.num_launches = 0

    def begin_launch(self) -> None:
        self.num_launches += 1

    def to_device(self, slot: int, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cpu":
            return tensor
        if self.device.type == "xla":  # device data made from the host tensor (no streams)
            return tensor.to(self.device)
        host = self._buffer(slot, tensor.numel(), tensor.dtype).view(tensor.shape)
        host.copy_(tensor)
        return host.to(self.device, non_blocking=True)

    def _buffer(self, slot: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        parity = self.num_launches % 2
        event = self._events.pop(parity, None)
        if event is not None:  # the set's previous copies (two launches ago) must have run
            event.synchronize()
        key = (slot, parity)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = _pinned(max(numel, 1 << 12), dtype)
            self._buffers[key] = buf
        return buf[:numel]

    def inputs_queued(self) -> None:
        """Mark this launch's set: its host-to-device copies are queued before here."""
        if self.device.type not in ("cpu", "xla"):
            event = torch.Event(device=self.device)
            event.record()
            self._events[self.num_launches % 2] = event


class StepHandle:
    """A launched step. ``result()`` waits for its sampled ids (an event, not a stream sync: a
    step launched after it keeps running) and puts them into the requests' states, once."""

    def __init__(self, steps: Optional["LaunchedSteps"], states: list[RunnerRequest],
                 sample_start: list[int], sampled: Optional[SamplerOutput],
                 host_ids: Optional[torch.Tensor], event, out: ModelRunnerOutput):
        self.steps = steps
        self.states = states  # the requests that sample, in row order
        self.sample_start = sample_start  # states[i]'s rows: sample_start[i]:sample_start[i + 1]
        self.sampled = sampled  # device tensors; logprobs already on their way to the host
        self.host_ids = host_ids  # pinned; valid once ``event`` completes
        self.event = event
        self.out = out
        # Request id -> its last row in the sampled ids (the token a step ahead feeds on).
        self.index = {st.request_id: sample_start[i + 1] - 1 for i, st in enumerate(states)}
        self.readback: Optional[torch.Tensor] = None  # the pooled pinned buffer under host_ids
        self._resolved = steps is None

    @classmethod
    def done(cls, out: ModelRunnerOutput) -> "StepHandle":
        """A step that sampled nothing (a partial prefill, an earlier pipeline stage)."""
        return cls(None, [], [0], None, None, None, out)

    def result(self) -> ModelRunnerOutput:
        if not self._resolved:
            self._resolved = True
            self.steps.resolve(self)
        return self.out


class DeferredSample:
    """A launched step whose sampling waits for its grammar mask (``grammar_deferred``: the
    mask needs the tokens of the step before). ``sample`` applies it and launches the sampler;
    ``result()`` is then the step's ``StepHandle.result()``."""

    def __init__(self, sample: Callable[..., StepHandle]):
        self._sample: Optional[Callable[..., StepHandle]] = sample
        self.handle: Optional[StepHandle] = None

    def sample(self, bitmask, bitmask_rows: dict[str, int]) -> None:
        sample, self._sample = self._sample, None
        self.handle = sample(bitmask, bitmask_rows)

    def result(self) -> ModelRunnerOutput:
        if self.handle is None:
            raise RuntimeError("This step waits for its grammar mask: sample_deferred() was not called.")
        return self.handle.result()


Collect = Callable[[StepHandle, list[int]], None]


class LaunchedSteps:
    """The runner's steps whose sampled ids the host has not read, oldest first."""

    def __init__(self, device: torch.device, collect: Collect):
        self.device = device
        self.collect = collect  # puts a resolved step's ids into states and its output
        self.unresolved: collections.deque[StepHandle] = collections.deque()
        self.last: Optional[StepHandle] = None  # the last launched step that sampled
        self._readback_pool: list[torch.Tensor] = []

    def launch_readback(self, states: list[RunnerRequest], sample_start: list[int],
                        result: SamplerOutput, out: ModelRunnerOutput) -> StepHandle:
        """Start copying the step's sampled ids (and logprobs) to the host; record an event."""
        n = sample_start[-1]
        event = buffer = None
        if self.device.type == "cpu":
            host = result.token_ids
        else:
            buffer = self._take_readback(n)
            host = buffer[:n]
            host.copy_(result.token_ids, non_blocking=True)
            for name in ("sampled_logprob", "sampled_rank", "topk_ids", "topk_logprobs",
                         "full_ids", "full_logprobs", "id_logprobs", "num_nans"):
                value = getattr(result, name)
                if value is not None:
                    setattr(result, name, value.to("cpu", non_blocking=True))
            event = torch.Event(device=self.device)
            event.record()
        for state in states:
            state.num_pending += 1
        handle = StepHandle(self, states, sample_start, result, host, event, out)
        handle.readback = buffer
        self.unresolved.append(handle)
        self.last = handle
        return handle

    def resolve(self, handle: StepHandle) -> None:
        while self.unresolved and self.unresolved[0] is not handle:
            self.unresolved[0].result()  # in launch order: tokens append in order
        if handle.event is not None:
            handle.event.synchronize()
        for state in handle.states:
            state.num_pending -= 1
        self.collect(handle, handle.host_ids.tolist())
        if self.unresolved and self.unresolved[0] is handle:
            self.unresolved.popleft()
        if handle.readback is not None:
            self._readback_pool.append(handle.readback)
        # ``last`` keeps its device ids: a feed taken from them stays valid.

    def resolve_all(self) -> None:
        """Wait for every launched step and put its tokens into the requests' states."""
        while self.unresolved:
            self.unresolved[0].result()

    def input_token(self, state: RunnerRequest, pos: int, row: int, feed: list[tuple[int, int]]) -> int:
        """The input id at ``pos``; for a pending token, 0 and ``(row, row in the last step's
        sampled ids)`` added to ``feed`` (copied on the device)."""
        if pos < len(state.token_ids):
            return state.token_ids[pos]
        last = self.last
        if (last is not None and pos == len(state.token_ids) and state.num_pending == 1
                and state.request_id in last.index):
            feed.append((row, last.index[state.request_id]))
            return 0
        self.resolve_all()  # not the last step's token (not expected): a host sync, see above
        return state.token_ids[pos]

    def apply_feed(self, input_ids: torch.Tensor, feed: list[tuple[int, int]],
                   staging: Staging) -> torch.Tensor:
        """Copy pending tokens from the last step's sampled ids into ``input_ids`` (device)."""
        if not feed:
            return input_ids
        rows = np.asarray(feed, dtype=np.int64)
        dst = staging.to_device(5, np.ascontiguousarray(rows[:, 0]))
        src = staging.to_device(6, np.ascontiguousarray(rows[:, 1]))
        input_ids.index_copy_(0, dst, self.last.sampled.token_ids.index_select(0, src))
        return input_ids

    def _take_readback(self, n: int) -> torch.Tensor:
        """A pinned int64 buffer of at least ``n`` for a step's sampled ids, back in the pool
        once the host has read them (``resolve``)."""
        for i, buf in enumerate(self._readback_pool):
            if buf.numel() >= n:
                return self._readback_pool.pop(i)
        return _pinned(max(n, 1024), torch.int64)


def _pinned(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A pinned host buffer; a plain one where the device's runtime cannot pin (then copies
    are synchronous, as they would be anyway). Allocated once per size, never per step."""
    buf = torch.empty(numel, dtype=dtype)
    try:
        return buf.pin_memory()
    except RuntimeError:
        return buf
