"""What a data-parallel engine core (or a Ray Serve replica's engine) reports about its load,
and the load score on it: plain Python, shared by the front end's balancer
(``load_balance.LoadBalancer``, whose module docstring gives the score and the speed factor)
and the Ray Serve router (``entrypoints/ray_serve/replica_load.py``).

* ``core_load`` (in a core, with each step's outputs): queues, free slots and KV blocks, prefill
  steps ahead, the adds received, the step time (``StepTimer``); ``waiting_kv_blocks`` adds the
  waiting requests' KV need for a Ray Serve replica's report.
* ``load_score`` / ``load_score_parts`` (in the front end): the score of a core once a request
  lands there, split into the work ahead and the request's own term; ``speed_factors``: each
  core's weight on its work ahead, from the step times.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields
from typing import Optional

_WAITING_WEIGHT = 4  # a queued request weighs this many running ones (vLLM's client: 4)
_STEP_EMA = 1 / 16  # weight of a step's time in the moving average (StepTimer)
_MIN_STEPS = 8  # steps before a core's step time counts (its first ones may compile, warm up)
_SPEED_CLAMP = 4.0  # a core's speed factor stays within [1/4, 4] ...
_SPEED_DEAD_BAND = 1.25  # ... and is 1 while within a quarter of the median


@dataclass
class CoreLoad:
    """A core's figures for the balancer, as of its latest step (``core_load``). Before its
    first report a core counts as idle with room for anything."""

    waiting: int = 0  # requests queued (or preempted), not running
    running: int = 0  # requests holding KV blocks, decoding or prefilling
    free_seqs: Optional[int] = None  # request slots left (max_num_seqs - running); None: unknown
    free_blocks: Optional[int] = None  # KV blocks free (cached-but-free included); None: unknown
    prefill_steps: int = 0  # whole steps of token budget the running requests' prompts still take
    received: int = 0  # requests the core has received from the front end since it started
    token_budget: Optional[int] = None  # tokens one step computes at most; None: unknown
    step_ms: Optional[float] = None  # moving average of its busy steps' wall time; None: no history
    # KV blocks its waiting requests need to start, a block shared with a running request or an
    # earlier waiting one counted once (``waiting_kv_blocks``); None: not reported
    waiting_blocks: Optional[int] = None

    @classmethod
    def from_dict(cls, d: dict) -> "CoreLoad":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class StepTimer:
    """A core's step time, as a moving average over the steps that computed tokens (module
    docstring, Speed); None (no history: average) until ``_MIN_STEPS`` such steps. Idle time
    never counts.

    A step is timed when its result comes back, from its launch or from the result before it,
    whichever is later (``step``): with steps in flight (async scheduling, pipeline stages) a
    call that only launches one returns at once, and the step's work is in the call that
    waits for it; a step launched behind another one starts once that one is done::

        sync:   |launch A .. A back|      |launch B .. B back|        A: its call, B: its call
        async:  |launch A|  |launch B, A back|  |B back|              A: launch A -> A back
                                                                      B: A back -> B back
    """

    def __init__(self):
        self._avg: Optional[float] = None
        self._steps = 0
        self._launches: deque = deque()  # launch times of the steps in flight, oldest first
        self._last_result: Optional[float] = None

    def step(self, start: float, end: float, launched: bool, in_flight: int) -> None:
        """One engine-core step call from ``start`` to ``end`` (``time.perf_counter``):
        ``launched`` a step that computes tokens, ``in_flight`` steps left in flight after it;
        the steps whose results came back in the call are recorded."""
        if launched:
            self._launches.append(start)
        while len(self._launches) > in_flight:
            began = self._launches.popleft()
            if self._last_result is not None:
                began = max(began, self._last_result)
            if end > began:
                self.record(end - began)
            self._last_result = end

    def record(self, seconds: float) -> None:
        ms = seconds * 1000.0
        self._avg = ms if self._avg is None else self._avg + _STEP_EMA * (ms - self._avg)
        self._steps += 1

    @property
    def ms(self) -> Optional[float]:
        return self._avg if self._steps >= _MIN_STEPS else None


def core_load(scheduler, received: int, step_ms: Optional[float] = None) -> dict:
    """What a core reports with each step's outputs (``CoreLoad`` as a dict): its scheduler's
    queues and free room, ``received``, the adds it has had, and ``step_ms``, its
    ``StepTimer``'s. One pass over the running requests (their prompt tokens not yet computed);
    sent only when there are several cores."""
    pending = 0
    for req in scheduler.running:
        pending += max(0, req.num_prompt_tokens - req.num_computed_tokens)
    config = scheduler.config
    return {"waiting": len(scheduler.waiting), "running": len(scheduler.running),
            "free_seqs": config.max_num_seqs - len(scheduler.running),
            "free_blocks": scheduler.kv.num_free_blocks,
            "prefill_steps": pending // max(1, config.max_num_batched_tokens), "received": received,
            "token_budget": config.max_num_batched_tokens,
            "step_ms": None if step_ms is None else round(step_ms, 3)}


def waiting_kv_blocks(scheduler) -> int:
    """``CoreLoad.waiting_blocks``: the KV blocks the waiting requests need to start. A
    leading prompt block a running request holds, or an earlier waiting request needs too,
    counts once (it is shared when they start); a later sample of an n > 1 request shares its
    first sample's full prompt blocks (it waits for that prefill). A request not hashed yet is
    hashed here (its admission would hash it anyway, and keeps them: each block is hashed once).
    For the Ray Serve replicas' reports (once a period), not every step."""
    kv = scheduler.kv
    seen: set = set()
    total = 0
    for req in scheduler.waiting:
        need = kv.blocks_needed(req.num_tokens) - len(kv.req_blocks.get(req.request_id, ()))
        if req.wait_for is not None:
            shared = req.num_prompt_tokens // kv.block_size
        elif not kv.enable_prefix_caching:
            shared = 0
        else:
            kv.update_block_hashes(req)
            shared = 0
            for h in req.block_hashes:
                block = kv.cached.get(h)
                if h not in seen and (block is None or block.ref_cnt == 0):
                    break
                shared += 1
            seen.update(req.block_hashes)
        total += max(0, need - shared)
    return total


def speed_factors(step_ms: list, enabled: Optional[bool] = None) -> list[float]:
    """Each core's speed factor (module docstring, Speed) from its step time (None: none yet);
    all 1 unless ``enabled`` (None: ``TESSELLM_BALANCE_BY_STEP_TIME``, off by default)."""
    if enabled is None:
        from tessellm import envs

        enabled = envs.balance_by_step_time()
    known = sorted(t for t in step_ms if t)
    if not known or not enabled:
        return [1.0] * len(step_ms)
    mid = len(known) // 2
    median = known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2
    out = []
    for t in step_ms:
        f = t / median if t else 1.0
        if 1 / _SPEED_DEAD_BAND <= f <= _SPEED_DEAD_BAND:
            f = 1.0
        out.append(min(_SPEED_CLAMP, max(1 / _SPEED_CLAMP, f)))
    return out


def load_score(report: CoreLoad, unreceived: int, num_prompt_tokens: int, block_size: int,
               num_samples: int = 1, shared_tokens: int = 0) -> int:
    """The load policy's score (module docstring) of an engine with ``report`` as its latest
    figures and ``unreceived`` requests sent to it since, once a prompt of ``num_prompt_tokens``
    lands there. Shared with the Ray Serve router (entrypoints/ray_serve/prefix_router.py),
    whose requests may run ``num_samples`` sequences (n > 1; here each sample is a request of
    its own): each counts, and needs a slot; they share the prompt's full blocks, each with a
    block of its own for its tail. ``shared_tokens``: the prompt's leading tokens whose blocks
    requests running there hold already (shared, not taken from the free blocks)."""
    return sum(load_score_parts(report, unreceived, num_prompt_tokens, block_size, num_samples,
                                shared_tokens))


def load_score_parts(report: CoreLoad, unreceived: int, num_prompt_tokens: int, block_size: int,
                     num_samples: int = 1, shared_tokens: int = 0) -> tuple[int, int]:
    """``load_score`` as ``(ahead, own)``: the work ahead of the request there (``4 x queued +
    running``) and its own term (1 a sample if it starts at once, else 4)::

        prompt:  |<- shared full blocks ->|<- its own full blocks ->|tail|
                  held by running requests  taken from free_blocks   one a sample
    """
    queued = report.waiting + max(0, unreceived) + report.prefill_steps
    bs = max(1, block_size)
    blocks = (-(-num_prompt_tokens // bs) - min(max(0, shared_tokens), num_prompt_tokens) // bs
              + (num_samples - 1) * (1 if num_prompt_tokens % bs else 0))
    at_once = (queued == 0 and (report.free_seqs is None or report.free_seqs >= num_samples)
               and (report.free_blocks is None or blocks <= report.free_blocks))
    return (_WAITING_WEIGHT * queued + report.running,
            num_samples * (1 if at_once else _WAITING_WEIGHT))
