"""vLLM's per-request phase histograms and request-parameter histograms on a real engine (tiny
random llama, cpu, float32), read through ``LLM.get_metrics()`` under both names:
``request_{prefill,decode,inference}_time_seconds``, ``request_time_per_output_token_seconds``,
``request_params_n``, ``request_params_max_tokens``, ``request_max_num_generation_tokens``,
``request_prefill_kv_computed_tokens``, and the two series whose ``vllm:`` name has vLLM's
meaning (``request_queue_time_seconds``, ``iteration_tokens_total``). Each is checked against
the requests' own ``RequestOutput.metrics`` stamps and token counts."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tessellm.inputs import TokensPrompt
from tessellm.metrics.reader import Histogram

ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, enforce_eager=True)
PROMPTS = [[5, 9, 11], [7, 3, 2, 8], [1, 2, 3, 4, 5]]
MAX_TOKENS = [1, 3, 6]  # one single-token request: no time per output token


def _histograms(llm) -> dict[str, Histogram]:
    return {m.name: m for m in llm.get_metrics() if isinstance(m, Histogram)}


@pytest.fixture(scope="module")
def run(tiny_model_dir):
    """Three n=1 requests, then one n=2 request; the histograms after each batch."""
    with LLM(tiny_model_dir("llama"), disable_log_stats=False, metrics_names="both", **ENGINE) as llm:
        params = [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for k in MAX_TOKENS]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
        first = _histograms(llm)
        two = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
        llm.generate([TokensPrompt(prompt_token_ids=[4, 4, 6])], two, use_tqdm=False)
        second = _histograms(llm)
    return outs, first, second


@pytest.mark.parametrize("prefix", ["tessellm:", "vllm:"])
def test_phase_times_match_the_requests_stamps(run, prefix):
    """vLLM's FinishedRequestStats: prefill = first token - scheduled, decode = last - first,
    inference = last - scheduled, TPOT = decode / (tokens - 1) for requests of 2+ tokens; the same
    values under both names."""
    outs, h, _ = run
    stamps = [o.metrics for o in outs]
    prefill = [m.first_token_ts - m.scheduled_ts for m in stamps]
    decode = [m.last_token_ts - m.first_token_ts for m in stamps]
    assert all(t > 0 for t in prefill) and decode[0] == 0 and all(t > 0 for t in decode[1:])
    for name, expected in (("request_prefill_time_seconds", prefill), ("request_decode_time_seconds", decode),
                           ("request_inference_time_seconds", [p + d for p, d in zip(prefill, decode)])):
        assert h[prefix + name].count == len(outs), name
        assert h[prefix + name].sum == pytest.approx(sum(expected), rel=1e-9, abs=1e-12), name
    inference, parts = h[prefix + "request_inference_time_seconds"].sum, sum(prefill) + sum(decode)
    assert inference == pytest.approx(parts, rel=1e-9)
    tpot = h[prefix + "request_time_per_output_token_seconds"]
    assert tpot.count == 2  # not the single-token request
    assert tpot.sum == pytest.approx(sum(d / (k - 1) for d, k in zip(decode, MAX_TOKENS) if k > 1), rel=1e-9)


def test_request_parameters_are_counted_per_request(run):
    """``request_params_n`` and ``request_max_num_generation_tokens`` once per request,
    ``request_params_max_tokens`` and ``request_prefill_kv_computed_tokens`` once per sequence
    (n=2 counts twice)."""
    outs, first, second = run
    for prefix in ("tessellm:", "vllm:"):
        n, most = first[prefix + "request_params_n"], first[prefix + "request_max_num_generation_tokens"]
        assert (n.count, n.sum) == (3, 3) and (most.count, most.sum) == (3, sum(MAX_TOKENS))
        n, most = second[prefix + "request_params_n"], second[prefix + "request_max_num_generation_tokens"]
        assert (n.count, n.sum) == (4, 5) and (most.count, most.sum) == (4, sum(MAX_TOKENS) + 4)
        max_tokens = second[prefix + "request_params_max_tokens"]
        assert (max_tokens.count, max_tokens.sum) == (5, sum(MAX_TOKENS) + 2 * 4)
        computed = first[prefix + "request_prefill_kv_computed_tokens"]
        assert computed.count == 3
        assert computed.sum == sum(len(o.prompt_token_ids) - o.num_cached_tokens for o in outs)
    assert list(second["vllm:request_params_n"].buckets) == ["1.0", "2.0", "5.0", "10.0", "20.0", "+Inf"]
    assert second["vllm:request_params_n"].buckets["1.0"] == 3  # cumulative: the three n=1


def test_vllm_queue_time_and_iteration_tokens_have_vllms_meaning(run):
    """``vllm:request_queue_time_seconds`` is the core's queue (scheduled - queued), not
    tessellm's arrival-to-scheduled; ``vllm:iteration_tokens_total`` sums, per batch of outputs,
    the prompts that got their first token plus the output tokens."""
    outs, h, _ = run
    queued = [o.metrics.scheduled_ts - o.metrics.queued_ts for o in outs]
    assert h["vllm:request_queue_time_seconds"].count == len(outs)
    assert h["vllm:request_queue_time_seconds"].sum == pytest.approx(sum(queued), rel=1e-9, abs=1e-12)
    ours = [o.metrics.first_scheduled_time - o.metrics.arrival_time for o in outs]
    assert h["tessellm:request_queue_time_seconds"].sum == pytest.approx(sum(ours), rel=1e-6, abs=1e-9)
    tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs)
    assert h["vllm:iteration_tokens_total"].sum == tokens
    assert h["vllm:iteration_tokens_total"].count == max(MAX_TOKENS)  # one batch of outputs per step
    # tessellm's: the tokens computed, so not each sequence's last output token (never fed back)
    assert h["tessellm:iteration_tokens_total"].sum == tokens - len(outs)


def test_the_spec_decode_examples_metric_loop(tiny_model_dir):
    """vLLM's examples/offline_inference/spec_decode.py reads the prefill and decode times from
    ``get_metrics()`` (``vllm:request_prefill_time_seconds`` / ``_decode_`` as Histograms) to
    print input and output throughput."""
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
    with LLM(tiny_model_dir("llama"), speculative_config=spec, disable_log_stats=False, metrics_names="vllm",
             **ENGINE) as llm:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=[5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6])],
                               SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
        metrics = llm.get_metrics()
    total_prefill_time = total_decode_time = 0.0
    for metric in metrics:
        if metric.name == "vllm:request_prefill_time_seconds":
            assert isinstance(metric, Histogram)
            total_prefill_time += metric.sum
        elif metric.name == "vllm:request_decode_time_seconds":
            assert isinstance(metric, Histogram)
            total_decode_time += metric.sum
    m = outputs[0].metrics
    assert total_prefill_time == pytest.approx(m.first_token_ts - m.scheduled_ts) and total_prefill_time > 0
    assert total_decode_time == pytest.approx(m.last_token_ts - m.first_token_ts) and total_decode_time > 0


def test_prefill_kv_computed_is_each_samples_own():
    """n=2, one sample computed its whole prompt, its sibling found half of it in the prefix
    cache: ``request_prefill_kv_computed_tokens`` observes 8 and 4 (vLLM's, per child request),
    not the siblings' largest cached count for both."""
    from tessellm.core.engine_output import EngineCoreOutput
    from tessellm.core.output_processor import OutputProcessor
    from tessellm.metrics.stats import IterationStats

    proc = OutputProcessor(tokenizer=None)
    proc.add_request("r", None, list(range(8)), SamplingParams(n=2, max_tokens=2), ["r-0", "r-1"])
    stats = IterationStats()
    proc.process([EngineCoreOutput("r-0", [1], num_cached_tokens=0, queued_ts=1.0, scheduled_ts=2.0),
                  EngineCoreOutput("r-1", [1], num_cached_tokens=4, queued_ts=1.0, scheduled_ts=2.0)],
                 stats, core_timestamp=3.0)
    proc.process([EngineCoreOutput("r-1", [2], "length", num_cached_tokens=4),
                  EngineCoreOutput("r-0", [2], "length", num_cached_tokens=0)], stats, core_timestamp=4.0)
    assert sorted(f.num_cached_tokens for f in stats.finished) == [0, 4]


def test_aborts_are_observed_as_vllm_observes_them():
    """vLLM observes a request the core ended as aborted (here: refused a request already
    queued) in every request-level histogram, as any finished request, and nothing of one the
    client aborted in the front end (vLLM issue #55634). tessellm does the same, but for
    counting the client's aborts in ``request_success_total{finished_reason="abort"}``."""
    from prometheus_client import CollectorRegistry

    from tessellm.core.engine_output import EngineCoreOutput
    from tessellm.core.output_processor import OutputProcessor
    from tessellm.metrics.prometheus import EngineMetrics
    from tessellm.metrics.reader import Counter, read_metrics
    from tessellm.metrics.stats import IterationStats

    proc, metrics = OutputProcessor(tokenizer=None), EngineMetrics("m", CollectorRegistry(), max_model_len=64)
    params = SamplingParams(max_tokens=4)
    proc.add_request("core", None, [1, 2, 3], params, ["core-0"])
    proc.add_request("client", None, [1, 2], params, ["client-0"])
    stats = IterationStats()
    proc.process([EngineCoreOutput("core-0", [], "abort", "its adapter failed to load", queued_ts=1.0),
                  EngineCoreOutput("client-0", [7], queued_ts=1.0, scheduled_ts=2.0)], stats, core_timestamp=3.0)
    proc.abort("client", stats)
    assert [(f.finish_reason, f.by_client) for f in stats.finished] == [("abort", False), ("abort", True)]
    metrics.observe_outputs(stats)

    read = read_metrics(metrics.view)
    seen = {m.name: m for m in read}
    success = [m for m in read if isinstance(m, Counter)
               and m.name == "tessellm:request_success" and m.labels.get("finished_reason") == "abort"]
    assert [m.value for m in success] == [2]  # both counted
    # the core's abort alone in the request-level histograms: its prompt, its 0 tokens, n = 1
    assert seen["tessellm:e2e_request_latency_seconds"].count == 1
    assert seen["tessellm:request_prompt_tokens"].sum == 3
    assert seen["tessellm:request_generation_tokens"].count == 1
    assert seen["tessellm:request_params_max_tokens"].sum == 4
    assert seen["tessellm:request_params_n"].count == 1
    assert seen["tessellm:request_prefill_time_seconds"].count == 0  # never scheduled: no phases
