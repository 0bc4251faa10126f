"""Prometheus metrics: exact counts on a real server's /metrics after a known set of requests,
text that Prometheus' own parser reads, the core's counters under KV pressure, and a Grafana
dashboard that only asks for names the server exports."""

from __future__ import annotations

import json
import pathlib
import random
import re
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tessellm.core.block_manager import BlockManager
from tessellm.core.request import Request
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.scheduler import Scheduler, SchedulerConfig
from tessellm.metrics.prometheus import EngineMetrics
from tessellm.metrics.stats import EngineStats, IterationStats, RequestTimes

SERVED_NAME = "metrics-model"
BLOCK_SIZE = 16  # the server's default
DASHBOARD = pathlib.Path(__file__).parents[2] / "deploy" / "grafana" / "tessellm-dashboard.json"


# -- reading /metrics ----------------------------------------------------------------------

class Scrape:
    """One /metrics scrape, parsed by prometheus_client's parser: sample name + labels -> value."""

    def __init__(self, text: str):
        self.families = list(text_string_to_metric_families(text))
        self.values: dict[tuple, float] = {}
        for family in self.families:
            for s in family.samples:
                self.values[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels) -> float:
        key = (name, tuple(sorted({"model_name": SERVED_NAME, **labels}.items())))
        assert key in self.values, f"{name}{labels} is not exported"
        return self.values[key]

    def delta(self, before: "Scrape", name: str, **labels) -> float:
        return self.get(name, **labels) - before.get(name, **labels)


def scrape(srv) -> Scrape:
    r = httpx.get(f"{srv.url}/metrics", timeout=30)  # no API key needed
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


def complete(srv, prompt, max_tokens: int, **extra) -> dict:
    r = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, timeout=120,
                   json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def fresh_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(1000, 40000) for _ in range(length)]


@pytest.fixture(scope="module")
def metrics_server(server_factory):
    """A server of its own: its counters start at zero and no other test's requests land in them."""
    return server_factory(["--served-model-name", SERVED_NAME])


@pytest.fixture(scope="module")
def rng():
    return random.Random(20240606)


# -- the server ----------------------------------------------------------------------------

def test_metrics_parse_with_every_name_labelled(metrics_server):
    page = scrape(metrics_server)
    names = {f.name for f in page.families}
    # The parser names counter families without their _total suffix.
    expected = {"tessellm:num_requests_running", "tessellm:num_requests_waiting",
                "tessellm:num_requests_waiting_by_reason",
                "tessellm:kv_cache_usage_perc", "tessellm:prefix_cache_queries",
                "tessellm:prefix_cache_hits", "tessellm:prompt_tokens", "tessellm:generation_tokens",
                "tessellm:num_preemptions", "tessellm:request_success",
                "tessellm:time_to_first_token_seconds", "tessellm:inter_token_latency_seconds",
                "tessellm:e2e_request_latency_seconds", "tessellm:request_queue_time_seconds",
                "tessellm:request_prompt_tokens", "tessellm:request_generation_tokens",
                "tessellm:iteration_tokens_total", "tessellm:device_memory_used_bytes",
                "tessellm:device_memory_total_bytes"}
    assert expected <= names, expected - names
    types = {f.name: f.type for f in page.families}
    assert types["tessellm:prompt_tokens"] == "counter"
    assert types["tessellm:time_to_first_token_seconds"] == "histogram"
    assert types["tessellm:kv_cache_usage_perc"] == "gauge"
    for family in page.families:
        assert family.name.startswith("tessellm:")
        for s in family.samples:
            assert s.labels.get("model_name") == SERVED_NAME, s
            assert not s.name.endswith("_created"), s
    # cpu: the engine core's resident set, which holds the model's weights
    assert page.get("tessellm:device_memory_used_bytes") > 50e6
    assert page.get("tessellm:device_memory_total_bytes") >= page.get("tessellm:device_memory_used_bytes")


def test_exact_counts_after_known_requests(metrics_server, rng):
    """Three requests, one at a time, prompts of 20/21/22 fresh tokens, 3/4/5 output tokens."""
    prompts = [fresh_prompt(rng, n) for n in (20, 21, 22)]
    max_tokens = [3, 4, 5]
    before = scrape(metrics_server)
    for prompt, n in zip(prompts, max_tokens):
        body = complete(metrics_server, prompt, n, ignore_eos=True)
        assert body["usage"]["completion_tokens"] == n
    after = scrape(metrics_server)

    def delta(name, **labels):
        return after.delta(before, name, **labels)

    num_prompt, num_gen = sum(map(len, prompts)), sum(max_tokens)  # 63, 12
    assert delta("tessellm:prompt_tokens_total") == num_prompt
    assert delta("tessellm:generation_tokens_total") == num_gen
    assert delta("tessellm:request_success_total", finished_reason="length") == 3
    assert delta("tessellm:request_success_total", finished_reason="stop") == 0
    assert delta("tessellm:request_success_total", finished_reason="abort") == 0
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prompt_tokens", "request_generation_tokens"):
        assert delta(f"tessellm:{name}_count") == 3, name
        assert delta(f"tessellm:{name}_bucket", le="+Inf") == 3, name
    assert delta("tessellm:request_prompt_tokens_sum") == num_prompt
    assert delta("tessellm:request_generation_tokens_sum") == num_gen
    # one inter-token gap per output after a request's first
    assert delta("tessellm:inter_token_latency_seconds_count") == num_gen - 3
    # alone in the engine, each request takes one prefill step then one step per further token,
    # and computes its prompt plus every output token but the last
    assert delta("tessellm:iteration_tokens_total_count") == num_gen
    assert delta("tessellm:iteration_tokens_total_sum") == num_prompt + num_gen - 3
    assert delta("tessellm:prefix_cache_queries_total") == num_prompt
    assert delta("tessellm:prefix_cache_hits_total") == 0
    assert delta("tessellm:num_preemptions_total") == 0
    # latencies are real and consistent: queue < TTFT <= e2e
    ttft = delta("tessellm:time_to_first_token_seconds_sum")
    e2e = delta("tessellm:e2e_request_latency_seconds_sum")
    queue = delta("tessellm:request_queue_time_seconds_sum")
    itl = delta("tessellm:inter_token_latency_seconds_sum")
    assert 0 <= queue < ttft <= e2e and itl > 0
    assert ttft + itl == pytest.approx(e2e, abs=1e-6)  # the same arrival stamps, summed
    # the request_prompt_tokens buckets: 20, 21 and 22 are all <= 50 and none <= 20 but one
    assert delta("tessellm:request_prompt_tokens_bucket", le="20.0") == 1
    assert delta("tessellm:request_prompt_tokens_bucket", le="50.0") == 3
    # idle again: the gauges say so
    assert after.get("tessellm:num_requests_running") == 0
    assert after.get("tessellm:num_requests_waiting") == 0
    assert after.get("tessellm:kv_cache_usage_perc") == 0


def test_prefix_cache_hits_after_repeating_a_prompt(metrics_server, rng):
    prompt = fresh_prompt(rng, 40)
    before = scrape(metrics_server)
    complete(metrics_server, prompt, 1)
    middle = scrape(metrics_server)
    body = complete(metrics_server, prompt, 1)
    after = scrape(metrics_server)
    # the first time nothing is cached; the second time every full block but the one holding the
    # last prompt token is: (40 - 1) // 16 = 2 blocks
    hit = (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert middle.delta(before, "tessellm:prefix_cache_queries_total") == 40
    assert middle.delta(before, "tessellm:prefix_cache_hits_total") == 0
    assert after.delta(middle, "tessellm:prefix_cache_queries_total") == 40
    assert after.delta(middle, "tessellm:prefix_cache_hits_total") == hit == 32
    # the cached tokens are not computed again (max_tokens=1: only the prompt is computed)
    assert after.delta(middle, "tessellm:iteration_tokens_total_sum") == 40 - hit
    assert middle.delta(before, "tessellm:iteration_tokens_total_sum") == 40
    # ... but they count as prompt tokens, by source: computed, or found in the prefix cache
    assert after.delta(middle, "tessellm:prompt_tokens_total") == 40
    by_source = "tessellm:prompt_tokens_by_source_total"
    assert middle.delta(before, by_source, source="local_compute") == 40
    assert after.delta(middle, by_source, source="local_compute") == 40 - hit
    assert after.delta(middle, by_source, source="local_cache_hit") == hit
    assert after.delta(before, by_source, source="external_kv_transfer") == 0
    assert after.delta(middle, "tessellm:prompt_tokens_cached_total") == hit
    assert after.delta(before, "tessellm:prompt_tokens_recomputed_total") == 0  # 40 fills no last block
    assert body["usage"]["prompt_tokens"] == 40


def test_samples_count_as_sequences(metrics_server, rng):
    """n=2: two sequences; the second takes the first's prompt blocks from the prefix cache."""
    prompt = fresh_prompt(rng, 40)
    before = scrape(metrics_server)
    body = complete(metrics_server, prompt, 3, n=2, ignore_eos=True)
    after = scrape(metrics_server)
    assert body["usage"]["completion_tokens"] == 6

    def delta(name, **labels):
        return after.delta(before, name, **labels)

    hit = (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert delta("tessellm:request_success_total", finished_reason="length") == 2
    assert delta("tessellm:generation_tokens_total") == 6
    assert delta("tessellm:prompt_tokens_total") == 80
    assert delta("tessellm:time_to_first_token_seconds_count") == 2
    assert delta("tessellm:inter_token_latency_seconds_count") == 4
    assert delta("tessellm:prefix_cache_queries_total") == 80
    assert delta("tessellm:prefix_cache_hits_total") == hit
    assert delta("tessellm:iteration_tokens_total_sum") == 40 + (40 - hit) + 2 * 2


def test_stop_string_counts_stop_and_tokens_until_it(metrics_server, rng):
    """A stop string ends a request in the front end: it counts as "stop", with the tokens that
    reached the front end up to the stop (not those the core made before its abort arrived)."""
    prompt = "Write the numbers from one to twenty in words:"
    first = complete(metrics_server, prompt, 3, ignore_eos=True)["choices"][0]["text"]
    assert first.strip(), "greedy decoding should produce text"
    before = scrape(metrics_server)
    body = complete(metrics_server, prompt, 12, ignore_eos=True, stop=[first])
    after = scrape(metrics_server)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert after.delta(before, "tessellm:request_success_total", finished_reason="stop") == 1
    assert after.delta(before, "tessellm:request_success_total", finished_reason="length") == 0
    assert after.delta(before, "tessellm:generation_tokens_total") == 3
    assert after.delta(before, "tessellm:request_generation_tokens_sum") == 3
    assert after.delta(before, "tessellm:e2e_request_latency_seconds_count") == 1


def test_client_disconnect_counts_abort(metrics_server, rng):
    before = scrape(metrics_server)
    with httpx.stream("POST", f"{metrics_server.url}/v1/completions", headers=metrics_server.headers,
                      timeout=60, json={"prompt": fresh_prompt(rng, 10), "max_tokens": 500,
                                        "ignore_eos": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one token seen: hang up
    deadline = time.monotonic() + 30
    while True:
        page = scrape(metrics_server)
        if (page.delta(before, "tessellm:request_success_total", finished_reason="abort") == 1
                and page.get("tessellm:num_requests_running") == 0):
            break
        assert time.monotonic() < deadline, "the disconnect was not counted as an abort"
        time.sleep(0.2)
    # an aborted request's latency says nothing about the engine: not observed
    assert page.delta(before, "tessellm:e2e_request_latency_seconds_count") == 0
    assert page.delta(before, "tessellm:request_success_total", finished_reason="length") == 0
    assert page.get("tessellm:kv_cache_usage_perc") == 0
    assert 1 <= page.delta(before, "tessellm:generation_tokens_total") < 500


# -- the core's counters (plain Python, no model) --------------------------------------------

def test_prefix_queries_counted_once_per_admitted_request():
    """A request that waits for blocks through several steps is looked up once, when admitted."""
    kv = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), kv)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    big = Request("big", list(range(12)), params)  # 3 blocks of 4, then a 4th for its outputs
    small = Request("small", list(range(100, 108)), params)  # 2 blocks: must wait for big
    sched.add_request(big)
    sched.add_request(small)
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, {rid: [7] for rid in out.num_scheduled_tokens})
        steps += 1
    assert steps > 2, "small should have waited behind big for a few steps"
    assert kv.stats.queries == 12 + 8 and kv.stats.hits == 0
    assert sched.num_scheduled_tokens_total == (12 + 1) + (8 + 1)


def test_engines_in_one_process_have_separate_registries():
    a = EngineMetrics("a", CollectorRegistry(), max_model_len=1024)
    b = EngineMetrics("b", CollectorRegistry(), max_model_len=1024)
    a.observe_stats(EngineStats(num_running=2, prefix_cache_queries=10, prefix_cache_hits=4,
                                step_num_tokens=[7, 1]))
    a.observe_stats(EngineStats(num_running=1, prefix_cache_queries=25, prefix_cache_hits=4))
    it = IterationStats(now=100.0)
    times = RequestTimes(arrival_time=99.0, num_prompt_tokens=5, first_scheduled_time=None)
    it.observe_output(times, 1, first_scheduled_time=99.25)
    it.observe_finished(times, "length")
    b.observe_outputs(it)
    pa, pb = Scrape(a.render().decode()), Scrape(b.render().decode())
    key = lambda name, model, **labels: (name, tuple(sorted({"model_name": model, **labels}.items())))
    assert pa.values[key("tessellm:prefix_cache_queries_total", "a")] == 25  # totals, not sums
    assert pa.values[key("tessellm:num_requests_running", "a")] == 1
    assert pa.values[key("tessellm:iteration_tokens_total_sum", "a")] == 8
    assert pa.values[key("tessellm:generation_tokens_total", "a")] == 0
    assert pb.values[key("tessellm:generation_tokens_total", "b")] == 1
    assert pb.values[key("tessellm:time_to_first_token_seconds_sum", "b")] == 1.0
    assert pb.values[key("tessellm:request_queue_time_seconds_sum", "b")] == 0.25
    assert pb.values[key("tessellm:request_success_total", "b", finished_reason="length")] == 1


# -- the dashboard ---------------------------------------------------------------------------

def _exported_sample_names() -> set[str]:
    metrics = EngineMetrics("probe", CollectorRegistry())
    metrics.observe_stats(EngineStats(device_memory_used_bytes=1, device_memory_total_bytes=2))
    return {s.name for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}


def test_grafana_dashboard_uses_only_exported_names():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    used = {name for e in exprs for name in re.findall(r"tessellm:[a-zA-Z0-9_:]+", e)}
    exported = _exported_sample_names()
    assert used <= exported, f"the dashboard asks for names the server does not export: {used - exported}"
    for e in exprs:
        assert 'model_name=~"$model_name"' in e, e
    # every metric family of the server is on the dashboard
    families = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in exported}
    on_board = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in used}
    assert families <= on_board, families - on_board
