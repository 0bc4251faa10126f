"""What the metrics are computed from: plain dataclasses, no Prometheus, no torch.

Two sources, split by who knows what (the core never waits on the front end)::

    core process                                    API process (front end)
      EngineStats, one per "outputs" message  --->  gauges, counter deltas, iteration_tokens
      EngineCoreOutput.first_scheduled_time   --->  RequestTimes -> queue time
                                                    IterationStats, one per message handled:
                                                      TTFT, ITL, token counts, finished requests

Every time the metrics use is a ``time.time()`` wall-clock stamp: the core and the API process
share a host, so their stamps are comparable. Latencies are measured at the front end, when an
output reaches it, which is when a client can first see it. ``RequestStateStats`` (each
``RequestOutput.metrics``) also keeps vLLM's fields, with vLLM's clocks: the core's
``time.monotonic()`` stamps of queueing, first scheduling and the outputs carrying tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Protocol


@dataclass
class EngineStats:
    """The core's counters, sent with every ``outputs`` message (msgpack: a dict of these)."""

    num_running: int = 0  # core requests (one per sample) holding KV blocks now
    num_waiting: int = 0  # queued or preempted
    # Of those, vLLM's "deferred" (a KV connector load or lookup, a grammar, a LoRA slot); the
    # others wait for "capacity" (Scheduler.deferred): num_requests_waiting_by_reason
    num_waiting_deferred: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks held by requests, 0..1
    num_preemptions_total: int = 0  # since the core started
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of which found there, since start
    # Tokens computed (prefill chunks + decodes) by each engine step since the previous message.
    step_num_tokens: list[int] = field(default_factory=list)
    # Device memory in use, as the backend reports it (on cpu: the core process's RSS); None
    # when the backend cannot tell. Sampled at most once a second (see DeviceMemoryProbe).
    device_memory_used_bytes: Optional[int] = None
    device_memory_total_bytes: Optional[int] = None
    # Triton JIT compilations in the core process since it said ready (warm-up should leave 0).
    triton_compilations_after_ready: int = 0
    # Speculative decoding totals since start (tessellm.spec_decode.metrics.SpecDecodeStats as a
    # dict: num_drafts, num_draft_tokens, num_accepted_tokens, accepted_per_pos); None: off.
    spec_decode: Optional[dict] = None
    # The host KV tier (--kv-offloading-size) since start: queries and hits (admitted requests'
    # prompt tokens, and those served from host memory), bytes_stored (device ->
    # host) and bytes_loaded (host -> device) over all ranks, usage (fraction of its blocks
    # holding a prefix, 0..1); None: no tier.
    kv_offload: Optional[dict] = None
    # A KV connector (--kv-transfer-config) since start: queries and hits (admitted requests'
    # prompt tokens, and those loaded through it), blocks_loaded, blocks_saved (offered to the
    # workers), load_failures (requests recomputed), lookup_timeouts (requests whose lookup
    # did not come back in time), store_down (times its store was marked down),
    # lookups_skipped and saves_skipped (requests and blocks while it was); None: no connector.
    kv_connector: Optional[dict] = None
    # Recurrent-state snapshots of prefix caching (Mamba / gated DeltaNet models;
    # core/state_prefix.py): slots and used now, saves, restores and evictions since start;
    # None: no pool.
    state_snapshots: Optional[dict] = None
    # With LoRA: {"running": [adapter names], "waiting": [...], "max_lora": slots} now (the
    # adapters of running and of waiting requests); None: LoRA off.
    lora: Optional[dict] = None
    # --kv-cache-metrics: the sampled KV blocks taken again since the previous message, each
    # [lifetime, idle, [reuse gaps]] in seconds (tessellm.metrics.kv_residency); None: off.
    # Like step_num_tokens, each message's own: merge_engine_stats leaves them out.
    kv_block_residency: Optional[list] = None

    @classmethod
    def from_dict(cls, d: dict) -> "EngineStats":
        """Decode a stats message; unknown keys (a newer core) are ignored."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RequestStateStats:
    """One sequence (one core request, i.e. one of a request's n samples): vLLM's
    ``RequestStateStats`` (what ``RequestOutput.metrics`` is there), plus tessellm's wall-clock
    stamps that its metrics are computed from.

    vLLM's fields keep vLLM's clocks: ``arrival_time`` is the front end's wall clock
    (``time.time()``); ``queued_ts``, ``scheduled_ts``, ``first_token_ts`` and ``last_token_ts``
    are the engine core's ``time.monotonic()`` (comparable with each other, not with
    ``arrival_time``; 0.0 until they happen), so ``queued_ts <= scheduled_ts <= first_token_ts
    <= last_token_ts``. tessellm's ``*_time`` fields are all wall clock.
    """

    num_generation_tokens: int = 0  # output tokens that reached the front end so far
    arrival_time: float = 0.0  # wall clock: when the front end accepted the request
    queued_ts: float = 0.0  # core, monotonic: when the scheduler queued it
    scheduled_ts: float = 0.0  # core, monotonic: when it was first scheduled (not after preemption)
    first_token_ts: float = 0.0  # core, monotonic: the core's outputs carrying its first token
    last_token_ts: float = 0.0  # core, monotonic: those carrying its newest token
    first_token_latency: float = 0.0  # seconds, arrival to its first token at the front end (TTFT)
    # vLLM's: some step's logits held a NaN (counted only with TESSELLM_COMPUTE_NANS_IN_LOGITS)
    is_corrupted: bool = False
    # tessellm's (wall clock, time.time())
    num_prompt_tokens: int = 0
    first_scheduled_time: Optional[float] = None  # from the core: when it left the queue
    first_token_time: Optional[float] = None  # when its first output token reached the front end
    last_token_time: Optional[float] = None  # when its newest output token did

    def observe_core(self, out, num_new_tokens: int, core_ts: float) -> None:
        """The core's monotonic stamps from one of its outputs (``EngineCoreOutput``: queued
        and scheduled on the first only) and ``core_ts``, when the core made that output."""
        if out.queued_ts is not None and not self.queued_ts:
            self.queued_ts = out.queued_ts
        if out.scheduled_ts is not None and not self.scheduled_ts:
            self.scheduled_ts = out.scheduled_ts
        if out.num_nans_in_logits:
            self.is_corrupted = True
        if num_new_tokens:
            self.first_token_ts = self.first_token_ts or core_ts
            self.last_token_ts = core_ts


RequestTimes = RequestStateStats  # tessellm's earlier name


@dataclass
class FinishedRequest:
    """A sequence that finished (any reason); the request-level histograms observe these.

    The phase times are vLLM's (``FinishedRequestStats``), from the core's monotonic stamps
    (``RequestStateStats``)::

        queued_ts ---- scheduled_ts ------ first_token_ts ------ last_token_ts
           |  queued_time  |  prefill_time   |    decode_time      |
                           |---------- inference_time -------------|

    A preemption inside a phase counts in it. None: the sequence never got that far (never
    scheduled: no times; scheduled but no token: only ``queued_time``).
    """

    finish_reason: str  # "stop", "length", "abort", "error" or "repetition"
    e2e_latency: float  # arrival to the final output, seconds
    queue_time: Optional[float]  # tessellm's: arrival to first scheduled (wall); None if never scheduled
    num_prompt_tokens: int
    num_generation_tokens: int
    queued_time: Optional[float] = None  # vLLM's: queued_ts to scheduled_ts, in the core
    prefill_time: Optional[float] = None  # scheduled_ts to first_token_ts
    decode_time: Optional[float] = None  # first_token_ts to last_token_ts
    inference_time: Optional[float] = None  # scheduled_ts to last_token_ts (prefill + decode)
    # decode_time / (num_generation_tokens - 1): the first token is the prefill's; None for <= 1
    mean_time_per_output_token: Optional[float] = None
    max_tokens_param: Optional[int] = None  # its SamplingParams.max_tokens (None: up to the context)
    num_cached_tokens: int = 0  # prompt tokens it did not compute (prefix cache, KV connector)
    # The client aborted it in the front end (went away, ``abort_request``): counted in
    # request_success{abort} only. An abort the core reports (it refused the request) is False.
    by_client: bool = False
    is_corrupted: bool = False  # its logits held a NaN in some step (RequestStateStats.is_corrupted)


def _phase_times(times: "RequestStateStats") -> dict:
    """vLLM's ``update_from_finished_request``: the phases this sequence reached."""
    if not (times.queued_ts and times.scheduled_ts):
        return {}
    out = {"queued_time": times.scheduled_ts - times.queued_ts}
    if times.first_token_ts and times.last_token_ts:
        decode = times.last_token_ts - times.first_token_ts
        out.update(prefill_time=times.first_token_ts - times.scheduled_ts, decode_time=decode,
                   inference_time=times.last_token_ts - times.scheduled_ts)
        if times.num_generation_tokens > 1:
            out["mean_time_per_output_token"] = decode / (times.num_generation_tokens - 1)
    return out


@dataclass
class PromptTokenStats:
    """Prompt tokens of sequences that got their first token, by where their KV came from
    (vLLM's ``PromptTokenStats``, with its invariants)::

        computed + local_cache_hit + external_kv_transfer - recomputed = total
        local_cache_hit + external_kv_transfer - recomputed = cached

    ``computed``: prefilled here (recomputed tokens included); ``local_cache_hit``: found in
    the device prefix cache (recomputed ones included, as vLLM counts them);
    ``external_kv_transfer``: supplied by the host KV tier or a KV connector; ``cached``: not
    computed (the request's ``num_cached_tokens``); ``recomputed``: cached but computed anyway
    (a fully cached prompt's last block, ``BlockManager.num_recomputed``)."""

    SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")

    computed: int = 0
    local_cache_hit: int = 0
    external_kv_transfer: int = 0
    cached: int = 0
    recomputed: int = 0
    total: int = 0

    def add(self, prompt_len: int, cached: int, external: int, recomputed: int) -> None:
        self.computed += prompt_len - cached
        self.external_kv_transfer += external
        self.local_cache_hit += cached + recomputed - external
        self.cached += cached
        self.recomputed += recomputed
        self.total += prompt_len

    def by_source(self) -> tuple[int, int, int]:
        """The counts of ``SOURCES``, in that order."""
        return self.computed, self.local_cache_hit, self.external_kv_transfer


@dataclass
class IterationStats:
    """What one batch of core outputs did, seen from the front end at time ``now``.

    The output processor fills it (``observe_output`` per core output, ``observe_finished``
    per sequence that ends); stat loggers read it.
    """

    now: float = field(default_factory=time.time)
    num_prompt_tokens: int = 0  # prompts of sequences that got their first token now
    prompt_tokens: PromptTokenStats = field(default_factory=PromptTokenStats)  # those, by source
    num_generation_tokens: int = 0  # output tokens that arrived now
    time_to_first_token: list[float] = field(default_factory=list)
    inter_token_latency: list[float] = field(default_factory=list)  # one per output after the first
    finished: list[FinishedRequest] = field(default_factory=list)
    # Per request (not per sample) whose samples all finished, none aborted: its n, and the
    # most output tokens any of its samples got (vLLM's n_params_iter,
    # max_num_generation_tokens_iter).
    n_params: list[int] = field(default_factory=list)
    max_num_generation_tokens: list[int] = field(default_factory=list)

    def observe_output(self, times: RequestTimes, num_new_tokens: int,
                       first_scheduled_time: Optional[float], num_cached: int = 0,
                       num_external: int = 0, num_recomputed: int = 0) -> None:
        """One core output of ``num_new_tokens`` kept tokens; ``num_cached`` .. ``num_recomputed``:
        its prompt's (``EngineCoreOutput``, on its first output), counted with its first token."""
        if first_scheduled_time is not None and times.first_scheduled_time is None:
            times.first_scheduled_time = first_scheduled_time
        if num_new_tokens == 0:
            return
        self.num_generation_tokens += num_new_tokens
        times.num_generation_tokens += num_new_tokens
        if times.first_token_time is None:
            times.first_token_time = self.now
            times.first_token_latency = self.now - times.arrival_time
            self.num_prompt_tokens += times.num_prompt_tokens
            self.prompt_tokens.add(times.num_prompt_tokens, num_cached, num_external, num_recomputed)
            self.time_to_first_token.append(times.first_token_latency)
        else:
            self.inter_token_latency.append(self.now - times.last_token_time)
        times.last_token_time = self.now

    def observe_finished(self, times: RequestTimes, finish_reason: str,
                         max_tokens: Optional[int] = None, num_cached_tokens: int = 0,
                         by_client: bool = False) -> None:
        queue_time = None
        if times.first_scheduled_time is not None:
            queue_time = max(0.0, times.first_scheduled_time - times.arrival_time)
        self.finished.append(FinishedRequest(finish_reason, self.now - times.arrival_time, queue_time,
                                             times.num_prompt_tokens, times.num_generation_tokens,
                                             max_tokens_param=max_tokens,
                                             num_cached_tokens=num_cached_tokens, by_client=by_client,
                                             is_corrupted=times.is_corrupted, **_phase_times(times)))

    def observe_request_finished(self, n: int, num_generation_tokens: list[int]) -> None:
        """A request's last sample finished (through the core: not aborted by the client):
        ``n`` and its samples' output counts."""
        self.n_params.append(n)
        self.max_num_generation_tokens.append(max(num_generation_tokens, default=0))

    @property
    def is_empty(self) -> bool:
        return not (self.num_generation_tokens or self.finished)


class StatLogger(Protocol):
    """What a front end feeds its metrics with (``AsyncLLM.add_stat_logger``).

    Both methods are called in the API process, on the event loop thread, by the task that reads
    the core's messages, so they must be quick and must not await or block. An exception
    raised here is logged and the logger is dropped; the engine keeps serving.
    """

    def observe_stats(self, stats: EngineStats) -> None:
        """Called once per ``outputs`` message from the core, before its outputs are processed."""

    def observe_outputs(self, iteration: IterationStats) -> None:
        """Called once per batch of outputs processed (and per abort made in the front end)."""


def merge_engine_stats(parts: list[EngineStats]) -> EngineStats:
    """Several engine cores' stats (data parallelism) as one engine's: counts and totals add up,
    KV cache usage is the mean (the cores' caches are alike), step token counts are joined,
    device memory adds up over the cores that report it (None when none does)."""
    if len(parts) == 1:
        return parts[0]
    used = [p.device_memory_used_bytes for p in parts if p.device_memory_used_bytes is not None]
    total = [p.device_memory_total_bytes for p in parts if p.device_memory_total_bytes is not None]
    return EngineStats(
        num_running=sum(p.num_running for p in parts), num_waiting=sum(p.num_waiting for p in parts),
        num_waiting_deferred=sum(p.num_waiting_deferred for p in parts),
        kv_cache_usage=sum(p.kv_cache_usage for p in parts) / max(1, len(parts)),
        num_preemptions_total=sum(p.num_preemptions_total for p in parts),
        prefix_cache_queries=sum(p.prefix_cache_queries for p in parts),
        prefix_cache_hits=sum(p.prefix_cache_hits for p in parts),
        step_num_tokens=[n for p in parts for n in p.step_num_tokens],
        device_memory_used_bytes=sum(used) if used else None,
        device_memory_total_bytes=sum(total) if total else None,
        triton_compilations_after_ready=sum(p.triton_compilations_after_ready for p in parts),
        spec_decode=_merge_spec_decode([p.spec_decode for p in parts if p.spec_decode]),
        kv_offload=_merge_kv_offload([p.kv_offload for p in parts if p.kv_offload]),
        kv_connector=_merge_totals([p.kv_connector for p in parts if p.kv_connector]),
        state_snapshots=_merge_totals([p.state_snapshots for p in parts if p.state_snapshots]),
        lora=_merge_lora([p.lora for p in parts if p.lora]))


def _merge_lora(parts: list[dict]) -> Optional[dict]:
    """The cores' adapters, each name once; slots per core (every core has as many)."""
    if not parts:
        return None
    return {key: list(dict.fromkeys(n for p in parts for n in p[key])) for key in ("running", "waiting")} | \
        {"max_lora": parts[0]["max_lora"]}


def _merge_totals(parts: list[dict]) -> Optional[dict]:
    """Running totals of the cores, added up key by key; None when no core has any."""
    if not parts:
        return None
    return {k: sum(p.get(k, 0) for p in parts) for k in parts[0]}


def _merge_kv_offload(parts: list[dict]) -> Optional[dict]:
    """The cores' host KV tiers as one: totals add up, usage is the mean."""
    if not parts:
        return None
    merged = {k: sum(p.get(k, 0) for p in parts) for k in ("queries", "hits", "bytes_stored",
                                                           "bytes_loaded")}
    merged["usage"] = sum(p.get("usage", 0.0) for p in parts) / len(parts)
    return merged


def _merge_spec_decode(parts: list[dict]) -> Optional[dict]:
    if not parts:
        return None
    merged = {k: sum(p.get(k, 0) for p in parts) for k in ("num_drafts", "num_draft_tokens",
                                                           "num_accepted_tokens")}
    width = max(len(p.get("accepted_per_pos", [])) for p in parts)
    merged["accepted_per_pos"] = [sum(p["accepted_per_pos"][i] for p in parts
                                      if i < len(p.get("accepted_per_pos", []))) for i in range(width)]
    return merged
