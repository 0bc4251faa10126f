"""Speculative decoding counters: vLLM's meanings, exported to Prometheus as running totals."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from tessellm.metrics.prometheus import EngineMetrics
from tessellm.metrics.stats import EngineStats
from tessellm.spec_decode.metrics import SpecDecodeStats


def test_counts_drafts_tokens_and_positions():
    s = SpecDecodeStats()
    s.observe(3, 2)  # 3 drafts, the first two accepted
    s.observe(3, 0)
    s.observe(1, 1)
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (3, 7, 3)
    assert s.accepted_per_pos == [2, 1, 0]
    assert s.mean_acceptance_length == 2.0 and abs(s.acceptance_rate - 3 / 7) < 1e-9


def test_prometheus_exports_the_totals():
    m = EngineMetrics("m", CollectorRegistry())
    s = SpecDecodeStats()
    s.observe(2, 1)
    m.observe_stats(EngineStats.from_dict({"spec_decode": s.as_dict()}))
    s.observe(2, 2)
    m.observe_stats(EngineStats.from_dict({"spec_decode": s.as_dict()}))
    text = generate_latest(m.registry).decode()
    assert 'tessellm:spec_decode_num_drafts_total{model_name="m"} 2.0' in text
    assert 'tessellm:spec_decode_num_draft_tokens_total{model_name="m"} 4.0' in text
    assert 'tessellm:spec_decode_num_accepted_tokens_total{model_name="m"} 3.0' in text
    assert 'tessellm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="1"} 1.0' in text
