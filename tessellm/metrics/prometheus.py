"""Prometheus metrics of one engine: the names vLLM users know, with the ``tessellm:`` prefix
(or vLLM's own ``vllm:`` names, or both: ``metrics_names``, ``tessellm.metrics.names``).

``EngineMetrics`` is a stat logger (see ``tessellm.metrics.stats.StatLogger``): the front end
that reads the core's messages (``AsyncLLM``) calls ``observe_stats`` with each message's
``EngineStats`` and ``observe_outputs`` with the ``IterationStats`` the output processor built
from it. Nothing here runs in the core process, and nothing here knows HTTP: the OpenAI server
serves ``render()`` on ``/metrics``; a Ray Serve replica can do the same with its own registry.

Each instance registers its metrics in the ``CollectorRegistry`` it is given, never in
prometheus_client's global one, so several engines (servers, replicas, tests) can live in one
process. Every metric is labelled ``model_name`` (the served model name).

Data parallelism (``num_engines`` > 1): every metric above is the whole engine's (the cores'
stats summed, ``merge_engine_stats``), and three gauges per core, labelled ``engine`` (its
index, as vLLM labels its engines), show how the load balancer spreads the work:
``engine_num_requests_running``, ``engine_num_requests_waiting``,
``engine_kv_cache_usage_perc``.
"""

from __future__ import annotations

import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from tessellm.metrics.buckets import (ITERATION_TOKEN_BUCKETS, ITL_BUCKETS,  # noqa: F401 - their old home
                                      REQUEST_SECONDS_BUCKETS, TTFT_BUCKETS, one_two_five_buckets)
from tessellm.metrics.kv_residency import RESIDENCY_BUCKETS
from tessellm.metrics.names import PREFIX, NamedView
from tessellm.metrics.request_metrics import FINISH_REASONS, RequestMetrics  # noqa: F401
from tessellm.metrics.stats import EngineStats
from tessellm.metrics.vllm_buckets import vllm_buckets

SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")  # by sleep level 0, 1, 2 (vLLM's)
WAITING_REASONS = ("capacity", "deferred")  # vLLM's num_requests_waiting_by_reason labels


class _BothBounds:
    """A histogram observed under tessellm's bounds and under vLLM's (``metrics_names=both``,
    where the two differ): the ``tessellm:`` series read the first, the ``vllm:`` ones the
    second (``NamedView.twins``)."""

    def __init__(self, ours, theirs):
        self.ours, self.theirs = ours, theirs

    def observe(self, value: float) -> None:
        self.ours.observe(value)
        self.theirs.observe(value)


class _CumulativeCounter:
    """A Counter fed with the core's running totals: increments by the difference."""

    def __init__(self, counter):
        self.counter = counter
        self.last = 0

    def update(self, total: int) -> None:
        delta = total - self.last
        if delta < 0:  # the source restarted from zero
            delta = total
        if delta:
            self.counter.inc(delta)
        self.last = total


class EngineMetrics(RequestMetrics):
    """The Prometheus metrics of one engine, labelled with its ``model_name``.

    ``max_model_len`` sets the top of the per-request token histograms; ``num_engines`` > 1 adds
    the per-core gauges (fed by ``observe_engine_stats``). ``names``: tessellm, vllm or both
    (``tessellm.metrics.names``); ``data_parallel_size``: the engine cores the stats come from
    (> 1: no ``engine`` label on vLLM's names of whole-engine series); ``cache_config``
    (block_size, num_gpu_blocks, ...): the labels of ``vllm:cache_config_info``;
    ``kv_cache_metrics``: the KV block residency histograms (``--kv-cache-metrics``);
    ``corrupted_requests``: the count of requests with NaN logits (TESSELLM_COMPUTE_NANS_IN_LOGITS
    on, where the sampler counts them). A histogram's
    ``vllm:`` name has vLLM's bucket bounds (``tessellm.metrics.vllm_buckets``), its
    ``tessellm:`` name tessellm's.
    """

    def __init__(self, model_name: str, registry: CollectorRegistry, max_model_len: int = 8192,
                 num_engines: int = 1, names: str = "tessellm", data_parallel_size: int = 1,
                 cache_config: Optional[dict] = None, kv_cache_metrics: bool = False,
                 corrupted_requests: bool = False):
        self.model_name = model_name
        self.registry = registry
        self.view = NamedView(registry, names, max(num_engines, data_parallel_size), cache_config)
        self._vllm_buckets = vllm_buckets(max_model_len)
        self._add_core_metrics()
        self._add_request_metrics(one_two_five_buckets(max_model_len), corrupted_requests)
        self.residency = self._residency_metrics() if kv_cache_metrics else None
        if num_engines > 1:
            self._add_engine_metrics(num_engines)

    def _add_engine_metrics(self, num_engines: int) -> None:
        """Per data-parallel engine core, labelled ``engine``."""
        def gauge(name: str, doc: str) -> list:
            family = Gauge(PREFIX + name, doc, ["model_name", "engine"], registry=self.registry)
            return [family.labels(model_name=self.model_name, engine=str(i)) for i in range(num_engines)]

        self.engine_running = gauge("engine_num_requests_running", "Requests running in this "
                                    "data-parallel engine core now.")
        self.engine_waiting = gauge("engine_num_requests_waiting", "Requests waiting in this "
                                    "data-parallel engine core.")
        self.engine_kv_usage = gauge("engine_kv_cache_usage_perc", "KV cache usage of this "
                                     "data-parallel engine core, 1 = full.")

    def _metric(self, cls, name: str, doc: str, **kwargs):
        return cls(PREFIX + name, doc, ["model_name"], registry=self.registry, **kwargs)

    def _child(self, cls, name: str, doc: str, **kwargs):
        return self._metric(cls, name, doc, **kwargs).labels(model_name=self.model_name)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]):
        """A histogram with tessellm's ``buckets``; shown under its vLLM name (``vllm`` names)
        with vLLM's bounds, under both names (``both``) with each one's (``_BothBounds``)."""
        theirs = self._vllm_buckets.get(name, buckets) if self.view.names != "tessellm" else buckets
        if self.view.names == "vllm" or theirs == buckets:
            return self._child(Histogram, name, doc, buckets=theirs)
        twin = Histogram(PREFIX + name, doc, ["model_name"], registry=self.view.twins, buckets=theirs)
        return _BothBounds(self._child(Histogram, name, doc, buckets=buckets),
                           twin.labels(model_name=self.model_name))

    def _add_core_metrics(self) -> None:
        """What the core counts (``EngineStats``)."""
        self.num_running = self._child(Gauge, "num_requests_running",
                                       "Requests (one per sample) running in the engine now.")
        self.num_waiting = self._child(Gauge, "num_requests_waiting", "Requests (one per sample) "
                                       "waiting to be scheduled, preempted ones included.")
        by_reason = Gauge(PREFIX + "num_requests_waiting_by_reason", "Waiting requests by reason "
                          "(vLLM's): capacity = waiting for the step's capacity (KV blocks, token "
                          "budget, max_num_seqs); deferred = passed over for a reason of their own "
                          "(a KV connector load, a grammar compiling, a LoRA slot). The reasons add "
                          "up to num_requests_waiting.", ["model_name", "reason"], registry=self.registry)
        self.waiting_capacity, self.waiting_deferred = (
            by_reason.labels(model_name=self.model_name, reason=r) for r in WAITING_REASONS)
        self.kv_cache_usage = self._child(Gauge, "kv_cache_usage_perc", "KV cache usage: fraction "
                                          "of KV blocks held by requests, 1 = full.")
        # No child until the core reports a value: a backend that cannot tell exports nothing.
        self.device_used = self._metric(Gauge, "device_memory_used_bytes", "Device memory in use "
                                        "as the backend reports it (cpu: the engine core process's "
                                        "resident set size).")
        self.device_total = self._metric(Gauge, "device_memory_total_bytes", "Device memory in "
                                         "total (cpu: the host's physical memory).")
        self.preemptions = _CumulativeCounter(self._child(
            Counter, "num_preemptions_total", "Preemptions (a request's KV blocks freed for others; "
            "it is recomputed later)."))
        self.prefix_queries = _CumulativeCounter(self._child(
            Counter, "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache, "
            "once per admitted request."))
        self.prefix_hits = _CumulativeCounter(self._child(
            Counter, "prefix_cache_hits_total", "Prompt tokens found in the prefix cache."))
        self.compilations = self._child(Gauge, "triton_compilations_after_ready", "Triton JIT "
                                        "compilations in the engine core since warm-up ended "
                                        "(should stay 0; tessellm.metrics.compile_counter).")
        sleep = Gauge(PREFIX + "engine_sleep_state", "Sleep mode: awake = 1 while awake (0 asleep); "
                      "weights_offloaded = 1 in a level-1 sleep, discard_all = 1 in a level-2 one.",
                      ["model_name", "sleep_state"], registry=self.registry)
        self.sleep_state = [sleep.labels(model_name=self.model_name, sleep_state=s) for s in SLEEP_STATES]
        self.observe_sleep_state(0)
        self._add_spec_decode_metrics()
        self._kv_offload = None  # created when the core first reports a host tier
        self._kv_connector = None  # created when the core first reports a KV connector
        self._state_snapshots = None  # created when the core first reports a snapshot pool
        self._lora_info = None  # created when the core first reports LoRA
        self._lora_labels: Optional[tuple] = None
        # vLLM's iteration_tokens_total means something else (request_metrics.py): its own twin
        self.iteration_tokens = self._child(Histogram, "iteration_tokens_total", "Tokens computed "
                                            "per engine step (prefill chunks plus decodes).",
                                            buckets=ITERATION_TOKEN_BUCKETS)

    def _add_spec_decode_metrics(self) -> None:
        """Speculative decoding, with vLLM's meanings (tessellm.spec_decode.metrics)."""
        self.spec_drafts = _CumulativeCounter(self._child(
            Counter, "spec_decode_num_drafts_total", "Speculative verifications (a request "
            "verifying k >= 1 draft tokens in a step counts once)."))
        self.spec_draft_tokens = _CumulativeCounter(self._child(
            Counter, "spec_decode_num_draft_tokens_total", "Draft tokens verified."))
        self.spec_accepted = _CumulativeCounter(self._child(
            Counter, "spec_decode_num_accepted_tokens_total", "Draft tokens accepted."))
        self.spec_per_pos = Counter(PREFIX + "spec_decode_num_accepted_tokens_per_pos_total",
                                    "Verifications whose draft at this position (0-based) was "
                                    "accepted.", ["model_name", "position"], registry=self.registry)
        self._spec_per_pos: dict[int, _CumulativeCounter] = {}
        self._spec_position(0)  # exported at zero from the start, as the other counters

    def _observe_kv_offload(self, offload: Optional[dict]) -> None:
        """The host KV tier, with vLLM's names: its hits are ``external_prefix_cache_*``, its
        copies ``kv_offload_total_bytes`` by ``transfer_type`` (GPU: the device, whatever it is)."""
        if not offload:
            return
        if self._kv_offload is None:
            by_type = Counter(PREFIX + "kv_offload_total_bytes", "Bytes copied between the device "
                              "KV cache and the host tier, over all ranks.",
                              ["model_name", "transfer_type"], registry=self.registry)
            self._kv_offload = {
                "queries": _CumulativeCounter(self._child(
                    Counter, "external_prefix_cache_queries", "Prompt tokens looked up in the host "
                    "KV tier (--kv-offloading-size), once per admitted request.")),
                "hits": _CumulativeCounter(self._child(
                    Counter, "external_prefix_cache_hits", "Prompt tokens served from the host KV "
                    "tier (loaded back, not recomputed).")),
                "bytes_stored": _CumulativeCounter(by_type.labels(model_name=self.model_name,
                                                                  transfer_type="GPU_to_CPU")),
                "bytes_loaded": _CumulativeCounter(by_type.labels(model_name=self.model_name,
                                                                  transfer_type="CPU_to_GPU")),
                "usage": self._child(Gauge, "kv_offload_cpu_cache_usage_perc", "Host KV tier "
                                     "usage: fraction of its blocks holding a prefix, 1 = full."),
            }
        for key, metric in self._kv_offload.items():
            if key == "usage":
                metric.set(offload[key])
            else:
                metric.update(offload[key])

    def _observe_kv_connector(self, totals: Optional[dict]) -> None:
        """A KV connector (--kv-transfer-config): ``kv_connector_{queries,hits}_total`` in
        prompt tokens, ``kv_connector_blocks_{loaded,saved}_total``,
        ``kv_connector_save_failures_total`` (blocks), ``kv_connector_load_failures_total``
        (requests recomputed), ``kv_connector_lookup_timeouts_total`` (requests),
        ``kv_connector_store_down_total``, ``kv_connector_lookups_skipped_total`` (requests),
        ``kv_connector_saves_skipped_total`` (blocks) and
        ``kv_connector_remote_prefill_fallbacks_total`` (requests)."""
        if not totals:
            return
        if self._kv_connector is None:
            docs = {"queries": "Prompt tokens of admissions looked up through the KV connector.",
                    "hits": "Prompt tokens loaded through the KV connector (not recomputed).",
                    "blocks_loaded": "KV blocks loaded through the KV connector.",
                    "blocks_saved": "KV blocks saved through the KV connector (written, or there already).",
                    "save_failures": "KV blocks whose save through the KV connector failed.",
                    "load_failures": "Requests recomputed because a KV connector load failed.",
                    "lookup_timeouts": "Requests whose KV connector lookup did not come back in "
                                       "time (they computed their prompts).",
                    "store_down": "Times the KV connector's store was marked down (a lookup "
                                  "timed out, an I/O error, a write hung).",
                    "lookups_skipped": "Admissions answered without a KV connector lookup while "
                                       "its store was down (they computed their prompts).",
                    "saves_skipped": "KV blocks not saved because the connector's store was down.",
                    "remote_prefill_fallbacks": "Requests whose kv_transfer_params named a KV "
                                                "producer that computed their prompt instead."}
            self._kv_connector = {k: _CumulativeCounter(self._child(Counter, f"kv_connector_{k}", doc))
                                  for k, doc in docs.items()}
        for key, metric in self._kv_connector.items():
            metric.update(totals.get(key, 0))

    def _observe_state_snapshots(self, pool: Optional[dict]) -> None:
        """Prefix caching's recurrent-state snapshots (Mamba / gated DeltaNet models,
        core/state_prefix.py): ``recurrent_state_snapshot_slots`` and ``_used`` gauges,
        ``recurrent_state_snapshot_{saves,restores,evictions}_total``."""
        if not pool:
            return
        if self._state_snapshots is None:
            gauges = {"slots": "Recurrent-state snapshot slots of prefix caching (the pool size).",
                      "used": "Recurrent-state snapshot slots holding a snapshot (pending or "
                              "serving hits)."}
            counters = {"saves": "Recurrent-state snapshots saved (a slot taken for a save).",
                        "restores": "Prefix hits that started from a recurrent-state snapshot.",
                        "evictions": "Recurrent-state snapshots given up (taken over for a new "
                                     "save, or dropped with their cached block)."}
            self._state_snapshots = {
                **{k: self._child(Gauge, f"recurrent_state_snapshot_{k}", doc)
                   for k, doc in gauges.items()},
                **{k: _CumulativeCounter(self._child(Counter, f"recurrent_state_snapshot_{k}", doc))
                   for k, doc in counters.items()}}
        for key, metric in self._state_snapshots.items():
            if key in ("slots", "used"):
                metric.set(pool.get(key, 0))
            else:
                metric.update(pool.get(key, 0))

    def _observe_lora(self, lora: Optional[dict]) -> None:
        """vLLM's ``lora_requests_info`` (what the Gateway API Inference Extension's LoRA
        affinity reads): one series whose labels are ``max_lora`` and the comma-joined
        adapters of running and of waiting requests, valued at the time it was last set (a
        reader takes the series of the largest value). vLLM keeps every label set it ever
        showed; here the previous one is dropped when they change, so /metrics stays small."""
        if not lora:
            return
        if self._lora_info is None:
            self._lora_info = Gauge(PREFIX + "lora_requests_info", "LoRA adapters of the running "
                                    "and the waiting requests, and the adapter slots; the value is "
                                    "when it was last set.", ["max_lora", "waiting_lora_adapters",
                                                              "running_lora_adapters"],
                                    registry=self.registry)
        labels = (str(lora["max_lora"]), ",".join(lora["waiting"]), ",".join(lora["running"]))
        if labels != self._lora_labels:
            if self._lora_labels is not None:
                self._lora_info.remove(*self._lora_labels)
            self._lora_labels = labels
        self._lora_info.labels(*labels).set(time.time())

    def _spec_position(self, pos: int) -> _CumulativeCounter:
        if pos not in self._spec_per_pos:
            self._spec_per_pos[pos] = _CumulativeCounter(
                self.spec_per_pos.labels(model_name=self.model_name, position=str(pos)))
        return self._spec_per_pos[pos]

    def _observe_spec_decode(self, spec: Optional[dict]) -> None:
        if not spec:
            return
        self.spec_drafts.update(spec["num_drafts"])
        self.spec_draft_tokens.update(spec["num_draft_tokens"])
        self.spec_accepted.update(spec["num_accepted_tokens"])
        for pos, total in enumerate(spec["accepted_per_pos"]):
            self._spec_position(pos).update(total)

    # -- the stat logger interface --------------------------------------------------------

    def observe_stats(self, stats: EngineStats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.waiting_capacity.set(stats.num_waiting - stats.num_waiting_deferred)
        self.waiting_deferred.set(stats.num_waiting_deferred)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.preemptions.update(stats.num_preemptions_total)
        self.prefix_queries.update(stats.prefix_cache_queries)
        self.prefix_hits.update(stats.prefix_cache_hits)
        self.compilations.set(stats.triton_compilations_after_ready)
        self._observe_spec_decode(stats.spec_decode)
        self._observe_kv_offload(stats.kv_offload)
        self._observe_kv_connector(stats.kv_connector)
        self._observe_state_snapshots(stats.state_snapshots)
        self._observe_lora(stats.lora)
        self.observe_residency(stats.kv_block_residency)
        for n in stats.step_num_tokens:
            self.iteration_tokens.observe(n)
        if stats.device_memory_used_bytes is not None:
            self.device_used.labels(model_name=self.model_name).set(stats.device_memory_used_bytes)
        if stats.device_memory_total_bytes is not None:
            self.device_total.labels(model_name=self.model_name).set(stats.device_memory_total_bytes)

    def _residency_metrics(self) -> tuple:
        """--kv-cache-metrics: vLLM's sampled KV block residency (tessellm.metrics.kv_residency)."""
        docs = {"kv_block_lifetime_seconds": "KV block lifetime, taken to taken again (sampled blocks).",
                "kv_block_idle_before_evict_seconds": "KV block idle time, last use to taken again "
                                                      "(sampled blocks).",
                "kv_block_reuse_gap_seconds": "Time between prefix hits of a KV block, its last "
                                              "few (sampled blocks)."}
        return tuple(self._histogram(name, doc, RESIDENCY_BUCKETS) for name, doc in docs.items())

    def observe_residency(self, events: Optional[list]) -> None:
        """The core's residency events ([lifetime, idle, [gaps]] each) since its last message."""
        if not events or self.residency is None:
            return
        lifetime, idle, gap = self.residency
        for life, idle_s, gaps in events:
            lifetime.observe(life)
            idle.observe(idle_s)
            for g in gaps:
                gap.observe(g)

    def observe_sleep_state(self, level: int) -> None:
        """Sleep mode's state now (docs/sleep_mode.md): 0 awake, else the level of the sleep
        (1: weights offloaded, 2: discarded) until every part is awake again; set by the front
        end after each sleep and wake_up, not per step."""
        for i, gauge in enumerate(self.sleep_state):
            gauge.set(1 if i == level else 0)

    def observe_engine_stats(self, engine: int, stats: EngineStats) -> None:
        """One data-parallel core's own stats (``observe_stats`` gets the whole engine's)."""
        self.engine_running[engine].set(stats.num_running)
        self.engine_waiting[engine].set(stats.num_waiting)
        self.engine_kv_usage[engine].set(stats.kv_cache_usage)

    # -- exposition ----------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format, under the chosen names, without the
        ``*_created`` series (``tessellm.metrics.names.NamedView``)."""
        return generate_latest(self.view)

    content_type: str = CONTENT_TYPE_LATEST
