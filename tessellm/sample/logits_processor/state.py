"""The engine's processors and the batch they see: the runner calls ``update(rows)`` with the
step's sampled requests in logits-row order, before sampling, and the sampler ``apply``.

Invariant: after ``update(rows)``, every processor was told (``BatchUpdate``) that batch index
``i`` holds ``rows[i]``, so row ``i`` of the logits is the request it keeps at ``i``. Requests
are told apart by their runner state object: a preempted request comes back as a new one
(removed, later added again with its output so far), as does one that sat out a step (vLLM's
persistent batch drops unscheduled requests the same way).

From the processors' last batch to the step's rows: removals first, then each new request at
its target index when that is free (else at another free one), then moves in target order,
a swap where the target holds a request, a one-way move where it is empty::

    before   0:A  1:B  2:C        rows [C, D, A]
    removed  1 (B)                -> 0:A  1:_  2:C
    added    (1, D)               -> 0:A  1:D  2:C
    moved    (2, 0, SWAP)         -> 0:C  1:D  2:A
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from tessellm.core.sampling_params import SamplingParams
from tessellm.sample.logits_processor.interface import BatchUpdate, MoveDirectionality

logger = logging.getLogger(__name__)


class LogitsProcessorError(RuntimeError):
    """A processor raised in ``update_state`` or ``apply``: the step's requests fail with it."""


def _nothing_pending() -> None:
    return None


class OutputIds(Sequence):
    """A live view of a runner request's output token ids (vLLM hands processors the list
    itself; here it is the tail of ``RunnerRequest.token_ids``, read when asked). Under async
    scheduling the last steps' tokens may still be on the device (``num_pending``): a read
    first calls ``resolve`` (the runner's: wait for them), so only a processor that reads
    output ids waits for the steps in flight, and only when it reads."""

    __slots__ = ("_state", "_resolve")

    def __init__(self, state, resolve: Callable[[], None] = _nothing_pending):
        self._state = state
        self._resolve = resolve

    def _token_ids(self) -> list[int]:
        if getattr(self._state, "num_pending", 0):
            self._resolve()
        return self._state.token_ids

    def _ids(self) -> list[int]:
        return self._token_ids()[self._state.num_prompt_tokens:]

    def __len__(self) -> int:
        return len(self._token_ids()) - self._state.num_prompt_tokens

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._ids()[index]
        n = len(self)
        if not -n <= index < n:
            raise IndexError("output token index out of range")
        return self._state.token_ids[self._state.num_prompt_tokens + index % n]

    def __iter__(self):
        return iter(self._ids())

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __add__(self, other) -> list[int]:
        return self._ids() + list(other)

    def __repr__(self) -> str:
        return repr(self._ids())


def batch_update(before: list, rows: list, resolve: Callable[[], None] = _nothing_pending) -> Optional[BatchUpdate]:
    """The ``BatchUpdate`` that turns index -> request ``before`` into ``rows`` (see the module
    docstring); None when they are the same. ``resolve``: what an added request's output ids
    call before a read while tokens are pending (``OutputIds``)."""
    if len(before) == len(rows) and all(a is b for a, b in zip(before, rows)):
        return None
    wanted = {id(s) for s in rows}
    slots = list(before) + [None] * max(0, len(rows) - len(before))
    removed = [i for i, s in enumerate(before) if id(s) not in wanted]
    for i in removed:
        slots[i] = None
    where = {id(s): i for i, s in enumerate(slots) if s is not None}
    free = sorted(i for i, s in enumerate(slots) if s is None)
    new = [(j, s) for j, s in enumerate(rows) if id(s) not in where]
    targets = {j for j, _ in new} & set(free)
    others = [i for i in free if i not in targets]
    added = []
    for j, s in new:
        i = j if j in targets else others.pop(0)
        slots[i], where[id(s)] = s, i
        prompt = None if s.embeds_prompt else s.token_ids[:s.num_prompt_tokens]
        added.append((i, s.params, prompt, OutputIds(s, resolve)))
    reused = {i for i, *_ in added}
    removed = [i for i in removed if i not in reused]  # an added request replaces it
    moved = []
    for j, s in enumerate(rows):
        i = where[id(s)]
        if i == j:
            continue
        other = slots[j]
        moved.append((i, j, MoveDirectionality.SWAP if other is not None else MoveDirectionality.UNIDIRECTIONAL))
        slots[i], slots[j] = other, s
        where[id(s)] = j
        if other is not None:
            where[id(other)] = i
    return BatchUpdate(len(rows), removed, added, moved)


class LogitsProcessors:
    """One instance of each class (built here, in the process that samples) and their batch."""

    def __init__(self, classes: list[type], vllm_config, device: torch.device, is_pin_memory: bool):
        self._args = (vllm_config, device, is_pin_memory)
        self.classes = list(classes)
        self.processors = [cls(*self._args) for cls in self.classes]
        self._rows: list = []  # the runner states at each batch index, as the processors know it
        # The runner states of a failed step's requests (by id(): the state, its stand-in) while
        # a step scheduled before the failure was known still holds them (async scheduling).
        self._failed: dict[int, tuple] = {}
        self._split()

    def _split(self) -> None:
        """Which processors change the argmax (applied to every row before penalties) and
        which do not (applied after temperature, to random sampling only); asked once, as vLLM."""
        self.changes_argmax = [p for p in self.processors if not p.is_argmax_invariant()]
        self.keeps_argmax = [p for p in self.processors if p.is_argmax_invariant()]

    def update(self, rows: list, resolve: Callable[[], None] = _nothing_pending) -> None:
        """Tell every processor the step's rows (the runner's states, in logits-row order);
        ``resolve``: waits for the steps in flight, called when a processor reads output ids
        that are still pending. A request of a failed step is shown as a plain request
        (``_Finished``): it is finished, its tokens are discarded, and it must not fail the
        step it is still scheduled in."""
        if self._failed:
            rows = [self._failed.get(id(r), (r, r))[1] for r in rows]
        change = batch_update(self._rows, rows, resolve)
        self._rows = list(rows)
        for p in self.processors:
            _guarded(p, "update_state", change)

    def apply(self, logits: torch.Tensor, argmax_invariant: bool) -> torch.Tensor:
        for p in self.keeps_argmax if argmax_invariant else self.changes_argmax:
            out = _guarded(p, "apply", logits)
            if not isinstance(out, torch.Tensor) or out.shape != logits.shape:  # else the sampler fails
                what = type(out).__name__
                if isinstance(out, torch.Tensor):
                    what = f"a tensor of shape {tuple(out.shape)}"
                raise LogitsProcessorError(f"logits processor {type(p).__qualname__} returned {what} from "
                                           f"apply; it must return the logits, shape {tuple(logits.shape)}.")
            logits = out
        return logits

    def reset(self, failed: Sequence = ()) -> None:
        """After a processor raised (its state may be half-updated): fresh instances and an
        empty batch, so the next step adds its requests anew; ``failed``: the step's runner
        states, shown as plain requests from now on (``update``)."""
        self.processors = [cls(*self._args) for cls in self.classes]
        self._rows = []
        self._split()
        self._failed.update({id(r): (r, _Finished()) for r in failed})

    def forget_failed(self, live: dict) -> None:
        """Drop the failed requests the runner no longer holds (``live``: request id -> state)."""
        if self._failed:
            self._failed = {k: v for k, v in self._failed.items() if live.get(v[0].request_id) is v[0]}


class _Finished:
    """What the processors see at the row of a failed step's request while a later step still
    holds it: a request of default parameters, no prompt, no output."""

    def __init__(self):
        self.params, self.token_ids = SamplingParams(), []
        self.num_prompt_tokens, self.embeds_prompt = 0, False


def _guarded(processor, method: str, arg):
    try:
        return getattr(processor, method)(arg)
    except Exception as exc:  # noqa: BLE001 - a processor's bug fails its step's requests only
        name = type(processor).__qualname__
        logger.exception("Logits processor %s raised in %s; the step's requests fail.", name, method)
        raise LogitsProcessorError(f"logits processor {name} raised in {method}: "
                                   f"{type(exc).__name__}: {exc}") from exc
