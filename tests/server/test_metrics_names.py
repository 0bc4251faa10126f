"""``--metrics-names``: a real server's /metrics under vLLM's names (``vllm``) and under both
(``both``): names, types and labels as vLLM's, equal values under the two names of a series,
vLLM's bucket bounds on the ``vllm:`` histograms (tessellm's on the ``tessellm:`` ones),
``vllm:cache_config_info``; ``LLM.get_metrics()`` under the same setting; a bad value is one
clear error (the flag, the engine argument, the environment variable)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tessellm.metrics.names import VLLM_ALIASES, VLLM_FAMILIES, VLLM_OWN_MEANING

SERVED_NAME = "names-model"
# What a vLLM pod is read for: the Gateway API Inference Extension / llm-d's EPP (queue, running,
# KV usage, the prefix scorer's cache_config_info), KEDA / HPA, vLLM's Grafana dashboard.
ROUTER_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
MAX_MODEL_LEN = 1024  # the server tests' --max-model-len (tests/server/conftest.py)

# vLLM v1's bucket bounds (vllm/v1/metrics/loggers.py), written out here rather than imported
# from tessellm.metrics.vllm_buckets: a change there must fail this test.
REQUEST_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
VLLM_BUCKETS = {
    "vllm:time_to_first_token_seconds": [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                                         0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
                                         640.0, 2560.0],
    "vllm:inter_token_latency_seconds": [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                                         1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0],
    "vllm:e2e_request_latency_seconds": REQUEST_LATENCY,
    "vllm:request_queue_time_seconds": REQUEST_LATENCY,
    "vllm:request_prefill_time_seconds": REQUEST_LATENCY,
    "vllm:request_decode_time_seconds": REQUEST_LATENCY,
    "vllm:request_inference_time_seconds": REQUEST_LATENCY,
    "vllm:iteration_tokens_total": [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
    "vllm:request_params_n": [1, 2, 5, 10, 20],
}
# build_1_2_5_buckets(max_model_len): up to 1000 for 1024
VLLM_BUCKETS.update({name: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] for name in (
    "vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:request_params_max_tokens",
    "vllm:request_max_num_generation_tokens", "vllm:request_prefill_kv_computed_tokens")})
# the per-token and per-request time per output token; the first also under its old name
VLLM_BUCKETS.update({name: VLLM_BUCKETS["vllm:inter_token_latency_seconds"] for name in (
    "vllm:request_time_per_output_token_seconds", "vllm:time_per_output_token_seconds")})
OLD_NAMES = {"vllm:" + old: new for new, olds in VLLM_ALIASES.items() for old in olds}


def families(srv) -> dict:
    r = httpx.get(f"{srv.url}/metrics", timeout=30)
    assert r.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def samples(family) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


@pytest.fixture(scope="module", params=["vllm", "both"])
def names_server(request, server_factory):
    srv = server_factory(["--served-model-name", SERVED_NAME, "--metrics-names", request.param])
    r = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, timeout=120,
                   json={"prompt": "Hello there", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return request.param, srv


def test_vllm_names_types_and_labels(names_server):
    mode, srv = names_server
    fams = families(srv)
    for name in ROUTER_GAUGES + ("vllm:gpu_cache_usage_perc",):
        assert fams[name].type == "gauge"
        (labels,) = [s.labels for s in fams[name].samples]
        assert labels == {"model_name": SERVED_NAME, "engine": "0"}  # vLLM's label set
    assert fams["vllm:prompt_tokens"].type == "counter"
    assert fams["vllm:time_to_first_token_seconds"].type == "histogram"
    success = samples(fams["vllm:request_success"])
    key = ("vllm:request_success_total",
           (("engine", "0"), ("finished_reason", "length"), ("model_name", SERVED_NAME)))
    assert success[key] == 1
    generated = samples(fams["vllm:generation_tokens"])
    assert generated[("vllm:generation_tokens_total", (("engine", "0"), ("model_name", SERVED_NAME)))] == 4
    (info,) = fams["vllm:cache_config_info"].samples
    stats = httpx.get(f"{srv.url}/debug/stats", timeout=30).json()
    assert info.value == 1 and info.labels["block_size"] == str(stats["block_size"])
    assert info.labels["num_gpu_blocks"] == str(stats["num_kv_blocks"]) == "512"
    # tessellm's own series (no vLLM name) stay tessellm:; vLLM's names only under vllm:
    assert "tessellm:triton_compilations_after_ready" in fams
    tessellm_twins = {n for n in fams if n.startswith("tessellm:") and n[len("tessellm:"):] in VLLM_FAMILIES}
    assert tessellm_twins == (set() if mode == "vllm" else
                              {"tessellm:" + n[len("vllm:"):] for n in fams if n.startswith("vllm:")
                               and n != "vllm:cache_config_info" and n not in OLD_NAMES})


def bounds(family) -> list[float]:
    """A histogram's finite bucket bounds (its ``le`` values but +Inf)."""
    return sorted({float(s.labels["le"]) for s in family.samples
                   if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"})


def test_both_names_hold_equal_values(names_server):
    """Every sample of a vLLM name equals its tessellm twin's; a histogram's buckets differ
    (each name has its own bounds), its count, sum and +Inf bucket do not; but for the two
    whose vLLM meaning differs (queue time, iteration tokens: tested in
    tests/entrypoints/test_request_phase_metrics.py)."""
    mode, srv = names_server
    if mode != "both":
        pytest.skip("both names only with --metrics-names both")
    fams = families(srv)
    compared = 0
    for name, family in fams.items():
        base = OLD_NAMES.get(name, name[len("vllm:"):])
        if not name.startswith("vllm:") or name == "vllm:cache_config_info" or base in VLLM_OWN_MEANING:
            continue
        twin = fams["tessellm:" + base]
        assert twin.type == family.type
        ours = {(s.name.replace("tessellm:" + base, ""), tuple(sorted(s.labels.items()))): s.value
                for s in twin.samples}
        for s in family.samples:
            if family.type == "histogram" and s.name.endswith("_bucket") and s.labels["le"] != "+Inf":
                continue  # vLLM's bounds here, tessellm's there
            labels = {k: v for k, v in s.labels.items() if k != "engine"}
            assert ours[(s.name.replace(name, ""), tuple(sorted(labels.items())))] == s.value, s
            compared += 1
    assert compared > 30  # every counter and gauge; each histogram's count, sum and +Inf bucket


def test_vllm_histograms_have_vllms_buckets(names_server):
    """A dashboard or recording rule written for vLLM picks ``le="..."`` values: each ``vllm:``
    histogram of a real server's /metrics has vLLM's bounds, and saw the request's
    observations; under both, the ``tessellm:`` histograms keep tessellm's bounds."""
    from tessellm.metrics.prometheus import ITERATION_TOKEN_BUCKETS, TTFT_BUCKETS, one_two_five_buckets

    mode, srv = names_server
    fams = families(srv)
    assert {n for n, f in fams.items() if n.startswith("vllm:") and f.type == "histogram"} == set(VLLM_BUCKETS)
    for name, expected in VLLM_BUCKETS.items():
        assert bounds(fams[name]) == [float(b) for b in expected], name
        counts = [s.value for s in fams[name].samples if s.name.endswith("_count")]
        assert counts and counts[0] >= 1, name  # the completion was observed
    if mode == "both":
        assert bounds(fams["tessellm:time_to_first_token_seconds"]) == list(TTFT_BUCKETS)
        assert bounds(fams["tessellm:iteration_tokens_total"]) == list(ITERATION_TOKEN_BUCKETS)
        assert bounds(fams["tessellm:request_prompt_tokens"]) == list(one_two_five_buckets(MAX_MODEL_LEN))


def test_get_metrics_under_vllm_names(tiny_model_dir):
    """vLLM's examples match ``metric.name == "vllm:..."`` on ``LLM.get_metrics()``."""
    with LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64,
             disable_log_stats=False, metrics_names="vllm") as llm:
        llm.generate([{"prompt_token_ids": [5, 9, 11]}], SamplingParams(max_tokens=3, ignore_eos=True),
                     use_tqdm=False)
        metrics = {m.name: m for m in llm.get_metrics() if not getattr(m, "labels", {}).get("finished_reason")}
    assert metrics["vllm:prompt_tokens"].value == 3 and metrics["vllm:generation_tokens"].value == 3
    assert metrics["vllm:prompt_tokens"].labels["engine"] == "0"
    assert metrics["vllm:e2e_request_latency_seconds"].count == 1
    ttft = metrics["vllm:time_to_first_token_seconds"]  # vLLM's bounds here too
    assert list(ttft.buckets) == [str(b) for b in VLLM_BUCKETS[ttft.name]] + ["+Inf"]
    assert metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values == [0]
    assert not any(n.startswith("tessellm:") and n[len("tessellm:"):] in VLLM_FAMILIES for n in metrics)


def test_a_bad_value_is_one_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="metrics_names 'prometheus' is not understood; use tessellm"):
        EngineArgs(metrics_names="prometheus").validate()
    monkeypatch.setenv("TESSELLM_METRICS_NAMES", "vLLM:")
    with pytest.raises(ValueError, match="TESSELLM_METRICS_NAMES='vllm:' is not understood"):
        EngineArgs().validate()
    monkeypatch.setenv("TESSELLM_METRICS_NAMES", "VLLM")
    EngineArgs().validate()  # the variable is read case-blind
    out = subprocess.run([sys.executable, "-m", "tessellm.entrypoints.cli", "serve", "--metrics-names",
                          "prom"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--metrics-names: invalid choice: 'prom' (choose from" in out.stderr


def test_ray_serve_config_takes_the_setting():
    """A Ray Serve / KubeRay app sets it in its engine section (flat, as ``serve run`` gives it)."""
    from tessellm.entrypoints.ray_serve.config import parse_config

    config = parse_config({"engine.device": "cpu", "engine.metrics_names": "both"}, check_resources=False)
    assert config.engine_args(locate=False).metrics_names == "both"
    with pytest.raises(ValueError, match="metrics_names 'vLLM' is not understood"):
        parse_config({"engine.device": "cpu", "engine.metrics_names": "vLLM"}, check_resources=False)


def test_data_parallel_cores_under_vllms_engine_label():
    """-dp N: each core's own gauges as vLLM's ``{engine="i"}`` series; the whole engine's other
    series under vLLM's names carry no engine label (they are no one core's)."""
    from prometheus_client import CollectorRegistry

    from tessellm.metrics.prometheus import EngineMetrics
    from tessellm.metrics.stats import EngineStats

    metrics = EngineMetrics(SERVED_NAME, CollectorRegistry(), 1024, num_engines=2, names="vllm",
                            data_parallel_size=2, cache_config={"block_size": "16"})
    metrics.observe_engine_stats(1, EngineStats(num_running=3, num_waiting=2, kv_cache_usage=0.5))
    metrics.observe_stats(EngineStats(num_running=3, num_waiting=2, kv_cache_usage=0.25))
    fams = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    running = samples(fams["vllm:num_requests_running"])
    assert running == {("vllm:num_requests_running", (("engine", str(i)), ("model_name", SERVED_NAME))): v
                       for i, v in ((0, 0.0), (1, 3.0))}
    assert samples(fams["tessellm:num_requests_running"]) == {
        ("tessellm:num_requests_running", (("model_name", SERVED_NAME),)): 3.0}
    assert [s.labels for s in fams["vllm:prompt_tokens"].samples] == [{"model_name": SERVED_NAME}]
    assert [s.labels["engine"] for s in fams["vllm:cache_config_info"].samples] == ["0", "1"]
    assert "tessellm:engine_num_requests_running" not in fams
