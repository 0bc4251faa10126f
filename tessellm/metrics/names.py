"""Which names ``/metrics`` and ``LLM.get_metrics()`` use: tessellm's, vLLM's, or both.

``EngineMetrics`` keeps one registry of ``tessellm:`` series; ``NamedView`` renders it under the
names chosen by ``metrics_names`` (EngineArgs, ``--metrics-names``, ``TESSELLM_METRICS_NAMES``):

- ``tessellm`` (default): ``tessellm:NAME{model_name}`` only (the registry as it is).
- ``vllm``: every series vLLM also exports under exactly vLLM's name and labels
  (``vllm:NAME{model_name, engine}``), so dashboards, alerts, autoscalers and the Gateway API
  Inference Extension written for vLLM read it unchanged; the series vLLM has no name for stay
  ``tessellm:`` (no ``vllm:`` name is invented), plus vLLM's ``vllm:cache_config_info`` and its
  older names ``vllm:gpu_cache_usage_perc`` and ``vllm:time_per_output_token_seconds``; with
  LoRA, ``vllm:lora_requests_info``.
- ``both``: all of the above (a migration: old and new dashboards side by side).

One collector renders the registry once per scrape; a ``vllm:`` series is a relabelled copy of
the ``tessellm:`` sample, so the two names of a series always hold equal values, except a
histogram's buckets: its ``vllm:`` name has vLLM's bounds (``tessellm.metrics.vllm_buckets``), so
a dashboard's ``le="..."`` picks match. Under ``vllm`` the histogram is kept with vLLM's bounds
only; under ``both``, where the bounds differ, it is observed twice and the ``vllm:`` copy is
made from the twin kept with vLLM's bounds (``NamedView.twins``): counts and sums stay equal.
Two histograms mean something else in vLLM (``VLLM_OWN_MEANING``: queue time, iteration tokens):
their ``vllm:`` series is always made from a twin fed with vLLM's meaning, so it differs from
the ``tessellm:`` one (``tessellm.metrics.request_metrics``).

Data parallelism (``num_engines`` > 1): vLLM labels each engine core's series ``engine="i"``.
tessellm keeps the cores' own ``engine_num_requests_{running,waiting}`` and
``engine_kv_cache_usage_perc`` gauges; under vLLM's names those become
``vllm:num_requests_running{engine="i"}`` etc., and the other series (the whole engine's, summed
over the cores) carry no ``engine`` label rather than a false one.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from tessellm import envs

PREFIX = "tessellm:"
VLLM_PREFIX = "vllm:"
METRICS_NAMES = ("tessellm", "vllm", "both")

# Families (prometheus_client's family names: a counter's without "_total") that vLLM exports
# under "vllm:" + the same name, with the same meaning (vllm/v1/metrics/loggers.py,
# spec_decode/metrics.py, the offloading connector's metrics).
VLLM_FAMILIES = frozenset({
    "num_requests_running", "num_requests_waiting", "num_requests_waiting_by_reason",
    "kv_cache_usage_perc", "num_preemptions", "corrupted_requests",
    "prefix_cache_queries", "prefix_cache_hits", "external_prefix_cache_queries",
    "external_prefix_cache_hits", "kv_offload_total_bytes", "kv_offload_cpu_cache_usage_perc",
    "prompt_tokens", "prompt_tokens_by_source", "prompt_tokens_cached", "prompt_tokens_recomputed",
    "generation_tokens", "request_success", "engine_sleep_state", "time_to_first_token_seconds",
    "inter_token_latency_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
    "request_prompt_tokens", "request_generation_tokens", "iteration_tokens_total",
    "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
    "request_time_per_output_token_seconds", "request_params_n", "request_params_max_tokens",
    "request_max_num_generation_tokens", "request_prefill_kv_computed_tokens",
    "spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
    "spec_decode_num_accepted_tokens_per_pos", "lora_requests_info", "kv_block_lifetime_seconds",
    "kv_block_idle_before_evict_seconds", "kv_block_reuse_gap_seconds"})
# vLLM's older names, same values: the KV usage gauge's until 0.10 (older Gateway API Inference
# Extension releases read it by default); inter_token_latency_seconds' until 0.11 (vLLM's
# example Grafana dashboard's "Time Per Output Token Latency" panel reads it).
VLLM_ALIASES = {"kv_cache_usage_perc": ("gpu_cache_usage_perc",),
                "inter_token_latency_seconds": ("time_per_output_token_seconds",)}
# Families whose vLLM meaning differs from tessellm's: their vllm: series is a histogram of its
# own, kept in NamedView.twins (tessellm.metrics.request_metrics).
VLLM_OWN_MEANING = frozenset({"request_queue_time_seconds", "iteration_tokens_total"})
# Data parallelism: a core's own gauge -> vLLM's name for it (labelled engine="i" as vLLM's).
VLLM_PER_ENGINE = {"engine_num_requests_running": "num_requests_running",
                   "engine_num_requests_waiting": "num_requests_waiting",
                   "engine_kv_cache_usage_perc": "kv_cache_usage_perc"}


def check_metrics_names(value, where: str = "metrics_names ") -> str:
    if value not in METRICS_NAMES:
        raise ValueError(f"{where}{value!r} is not understood; use tessellm (tessellm:NAME, the "
                         "default), vllm (vLLM's vllm:NAME names and labels, for dashboards and "
                         "routers written for vLLM) or both (docs/metrics.md).")
    return value


def resolve_metrics_names(value: Optional[str]) -> str:
    """The engine argument where set, else ``TESSELLM_METRICS_NAMES``, else ``tessellm``."""
    if value is not None:
        return check_metrics_names(value)
    env = envs.metrics_names()
    if env is not None:
        return check_metrics_names(env, "TESSELLM_METRICS_NAMES=")
    return "tessellm"


class NamedView:
    """A registry view under the chosen names, without prometheus_client's ``*_created`` series
    (one extra series per counter and histogram that dashboards never read; prometheus_client
    can only turn them off process-wide). ``collect()`` is what ``generate_latest`` and
    ``tessellm.metrics.reader`` read. ``twins`` (``both`` only): the histograms kept with
    vLLM's bounds, under the same ``tessellm:`` family names, that the ``vllm:`` copies are made
    from instead."""

    def __init__(self, registry, names: str = "tessellm", num_engines: int = 1,
                 cache_config: Optional[dict] = None):
        self.registry = registry
        self.names = check_metrics_names(names)
        self.twins = CollectorRegistry(auto_describe=False) if self.names != "tessellm" else None
        self.engine_label = {"engine": "0"} if num_engines == 1 else {}
        self.renames = self._renames(num_engines)
        self.cache_config = [{**(cache_config or {}), "engine": str(i)} for i in range(num_engines)] \
            if cache_config is not None else []

    @staticmethod
    def _renames(num_engines: int) -> dict[str, tuple[str, ...]]:
        """tessellm family (no prefix) -> its vLLM names."""
        if num_engines == 1:
            return {f: (f, *VLLM_ALIASES.get(f, ())) for f in VLLM_FAMILIES}
        whole = set(VLLM_PER_ENGINE.values())  # the whole engine's gauges: no vLLM name under DP
        out = {f: (f, *VLLM_ALIASES.get(f, ())) for f in VLLM_FAMILIES - whole}
        out.update({core: (f, *VLLM_ALIASES.get(f, ())) for core, f in VLLM_PER_ENGINE.items()})
        return out

    def collect(self):
        twins = {f.name: f for f in self.twins.collect()} if self.twins is not None else {}
        for family in self.registry.collect():  # fresh objects on every collect: ours to edit
            family.samples = _without_created(family.samples)
            vllm_names = self.renames.get(family.name[len(PREFIX):], ()) if self.names != "tessellm" else ()
            if self.names != "vllm" or not vllm_names:
                yield family
            for name in vllm_names:
                yield self._renamed(twins.get(family.name, family), name)
        if self.names != "tessellm":
            yield from self._cache_config_info()

    def _renamed(self, family, name: str) -> Metric:
        old, new = family.name, VLLM_PREFIX + name
        out = Metric(new, family.documentation, family.type)
        labels = family.samples[0].labels if family.samples else {}
        # vLLM labels its engine metrics model_name + engine; lora_requests_info has neither
        extra = self.engine_label if "model_name" in labels and "engine" not in labels else {}
        out.samples = [s._replace(name=new + s.name[len(old):], labels={**s.labels, **extra})
                       for s in _without_created(family.samples)]
        return out

    def _cache_config_info(self):
        """vLLM's info gauge (value 1) of the KV cache: the router's prefix scorer reads its
        ``block_size`` and ``num_gpu_blocks`` labels."""
        if not self.cache_config:
            return
        out = Metric(VLLM_PREFIX + "cache_config_info", "Information of the engine's KV cache "
                     "(vLLM's CacheConfig fields that tessellm has).", "gauge")
        for labels in self.cache_config:
            out.add_sample(out.name, labels, 1.0)
        yield out


def _without_created(samples) -> list:
    return [s for s in samples if not s.name.endswith("_created")]


def cache_config_labels(args, info) -> dict:
    """``vllm:cache_config_info``'s labels that tessellm has, as vLLM writes them (strings)."""
    return {"block_size": str(info.block_size), "num_gpu_blocks": str(info.num_kv_blocks),
            "enable_prefix_caching": str(bool(args.enable_prefix_caching)),
            "cache_dtype": str(args.kv_cache_dtype)}


def engine_metrics_options(args, info) -> dict:
    """``EngineMetrics``' naming keywords for an engine of ``args`` (EngineArgs) and ``info``."""
    names = resolve_metrics_names(args.metrics_names)
    return {"names": names, "data_parallel_size": args.data_parallel_size,
            "kv_cache_metrics": args.kv_cache_metrics,
            "corrupted_requests": envs.compute_nans_in_logits(),  # the sampler counts NaN logits
            "cache_config": cache_config_labels(args, info) if names != "tessellm" else None}
