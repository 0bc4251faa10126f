"""vLLM's ``LLM.get_metrics()`` shapes (``vllm.v1.metrics.reader``): the engine's Prometheus
metrics as plain objects, read from its registry or a view of it (``tessellm.metrics.names``:
``tessellm:`` names by default, vLLM's ``vllm:`` names with ``metrics_names="vllm"``; the same
metrics as the server's ``/metrics``, docs/metrics.md)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry


@dataclass
class Metric:
    name: str  # e.g. "tessellm:prompt_tokens" (a counter's name without "_total", as vLLM's)
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    value: int


@dataclass
class Gauge(Metric):
    value: float


@dataclass
class Vector(Metric):
    """A counter kept per position (vLLM's: ``spec_decode_num_accepted_tokens_per_pos``): one
    series per ``position`` label, as a list indexed by position."""

    values: list[int]


@dataclass
class Histogram(Metric):
    count: int
    sum: float
    buckets: dict[str, int]  # upper bound ("0.5", ..., "+Inf") -> observations at or below it


def read_metrics(registry: CollectorRegistry) -> list[Metric]:
    """One ``Metric`` per labelled series of every family in ``registry`` (anything with
    ``collect()``: a registry, or ``EngineMetrics.view``)."""
    metrics: list[Metric] = []
    for family in registry.collect():
        if family.type == "counter":
            totals = [s for s in family.samples if s.name.endswith("_total")]
            if any("position" in s.labels for s in totals):
                metrics += _vectors(family.name, totals)
            else:
                metrics += [Counter(family.name, s.labels, int(s.value)) for s in totals]
        elif family.type == "gauge":
            metrics += [Gauge(family.name, s.labels, s.value) for s in family.samples]
        elif family.type == "histogram":
            metrics += _histograms(family)
    return metrics


def _histograms(family) -> list[Histogram]:
    series: dict[tuple, Histogram] = {}
    for s in family.samples:
        labels = {k: v for k, v in s.labels.items() if k != "le"}
        h = series.setdefault(tuple(sorted(labels.items())), Histogram(family.name, labels, 0, 0.0, {}))
        if s.name.endswith("_bucket"):
            h.buckets[s.labels["le"]] = int(s.value)
        elif s.name.endswith("_count"):
            h.count = int(s.value)
        elif s.name.endswith("_sum"):
            h.sum = s.value
    return list(series.values())


def _vectors(name: str, samples) -> list[Vector]:
    by_series: dict[tuple, dict[int, int]] = {}
    for s in samples:
        labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "position"))
        by_series.setdefault(labels, {})[int(s.labels["position"])] = int(s.value)
    return [Vector(name, dict(labels), [counts.get(i, 0) for i in range(max(counts) + 1)])
            for labels, counts in by_series.items()]
