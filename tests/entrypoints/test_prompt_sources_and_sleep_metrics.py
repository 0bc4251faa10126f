"""vLLM's prompt-token counters by source and its sleep-state gauge on a real engine (tiny
random llama, cpu, float32), read through ``LLM.get_metrics()`` under both names and from a
server's ``/metrics``: ``prompt_tokens_by_source{source}`` adds up to ``prompt_tokens`` (plus
the cached tokens computed anyway, as vLLM's invariant has it), ``prompt_tokens_cached`` equals
the requests' own ``num_cached_tokens``, ``prompt_tokens_recomputed`` counts a fully cached
prompt's last block, and ``engine_sleep_state`` follows ``sleep`` / ``wake_up``."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tessellm.inputs import TokensPrompt
from tessellm.metrics.reader import Counter, Gauge
from tessellm.metrics.stats import PromptTokenStats
from tests.server.in_process import serve

BLOCK = 4
ENGINE = dict(device="cpu", dtype="float32", block_size=BLOCK, num_kv_blocks=64, enforce_eager=True)
UNALIGNED = [3, 9, 27, 81, 17, 51, 20, 60, 11, 33]  # 10 tokens: a repeat hits (10 - 1) // 4 = 2 blocks
ALIGNED = [2, 4, 8, 16, 32, 64, 28, 56]  # 8 tokens: a repeat hits 1 block, computes its cached last


def _values(llm) -> dict[tuple, float]:
    out = {}
    for m in llm.get_metrics():
        if isinstance(m, (Counter, Gauge)):
            out[(m.name, m.labels.get("source") or m.labels.get("sleep_state"))] = m.value
    return out


def _generate(llm, prompt) -> int:
    """One request of ``prompt``; its ``num_cached_tokens``."""
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    out, = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    return out.num_cached_tokens


@pytest.fixture(scope="module")
def run(tiny_model_dir):
    """Each prompt twice (the repeat served from the prefix cache): the requests'
    ``num_cached_tokens`` and the counters after all four."""
    with LLM(tiny_model_dir("llama"), disable_log_stats=False, metrics_names="both", **ENGINE) as llm:
        cached = [_generate(llm, p) for p in (UNALIGNED, UNALIGNED, ALIGNED, ALIGNED)]
        return cached, _values(llm)


@pytest.mark.parametrize("prefix", ["tessellm:", "vllm:"])
def test_prompt_tokens_by_source_add_up(run, prefix):
    cached, v = run
    assert cached == [0, 8, 0, 4]
    total = 2 * len(UNALIGNED) + 2 * len(ALIGNED)
    assert v[(prefix + "prompt_tokens", None)] == total
    assert v[(prefix + "prompt_tokens_cached", None)] == sum(cached)
    # the aligned repeat: its last block (4 tokens) was cached, yet computed for the logits
    assert v[(prefix + "prompt_tokens_recomputed", None)] == BLOCK
    by_source = {s: v[(prefix + "prompt_tokens_by_source", s)] for s in PromptTokenStats.SOURCES}
    assert by_source == {"local_compute": total - sum(cached), "local_cache_hit": sum(cached) + BLOCK,
                         "external_kv_transfer": 0}
    # vLLM's invariants: sources - recomputed = total; cache hits - recomputed = cached
    assert sum(by_source.values()) - BLOCK == total
    assert by_source["local_cache_hit"] + by_source["external_kv_transfer"] - BLOCK == sum(cached)


def test_prompt_token_stats_count_external_tokens():
    """The host KV tier's or a connector's tokens are external_kv_transfer, not local hits."""
    stats = PromptTokenStats()
    stats.add(prompt_len=20, cached=16, external=12, recomputed=0)
    stats.add(prompt_len=8, cached=4, external=0, recomputed=4)
    assert stats.by_source() == (4 + 4, 4 + 8, 12)
    assert (stats.cached, stats.recomputed, stats.total) == (20, 4, 28)
    assert sum(stats.by_source()) - stats.recomputed == stats.total


def _sleep_state(values: dict, prefix: str) -> dict[str, float]:
    return {s: values[(prefix + "engine_sleep_state", s)] for s in ("awake", "weights_offloaded", "discard_all")}


def test_sleep_state_follows_sleep_and_wake_up_offline(tiny_model_dir):
    awake = {"awake": 1, "weights_offloaded": 0, "discard_all": 0}
    with LLM(tiny_model_dir("llama"), disable_log_stats=False, metrics_names="both", enable_sleep_mode=True,
             **ENGINE) as llm:
        for prefix in ("tessellm:", "vllm:"):
            assert _sleep_state(_values(llm), prefix) == awake
        llm.sleep(level=1)
        assert _sleep_state(_values(llm), "vllm:") == {"awake": 0, "weights_offloaded": 1, "discard_all": 0}
        llm.wake_up(tags=["weights"])  # the KV cache still sleeps: not awake yet (as vLLM's)
        assert _sleep_state(_values(llm), "tessellm:")["awake"] == 0
        llm.wake_up(tags=["kv_cache"])
        assert _sleep_state(_values(llm), "tessellm:") == awake
        llm.sleep(level=2)
        assert _sleep_state(_values(llm), "tessellm:") == {"awake": 0, "weights_offloaded": 0, "discard_all": 1}
        llm.wake_up()
        assert _sleep_state(_values(llm), "vllm:") == awake


def test_sleep_state_on_the_servers_metrics(tiny_model_dir, monkeypatch):
    """The server's gauge flips when the engine sleeps and wakes (AsyncLLM tells its loggers),
    with vLLM's labels under ``--metrics-names vllm``; with --kv-cache-metrics the residency
    histograms are exported from the start (empty until a followed block is taken again)."""
    monkeypatch.setenv("TESSELLM_SERVER_DEV_MODE", "1")

    async def state(c) -> dict[str, float]:
        text = (await c.get("/metrics")).text
        return {s.labels["sleep_state"]: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if f.name == "vllm:engine_sleep_state" and s.labels["engine"] == "0"}

    async def scenario(c):
        text = (await c.get("/metrics")).text
        assert 'vllm:kv_block_lifetime_seconds_count{engine="0",model_name="m"} 0.0' in text
        assert await state(c) == {"awake": 1, "weights_offloaded": 0, "discard_all": 0}
        assert (await c.post("/sleep", params={"level": 2})).status_code == 200
        assert await state(c) == {"awake": 0, "weights_offloaded": 0, "discard_all": 1}
        assert (await c.post("/sleep", params={"level": 7})).status_code == 400  # refused: unchanged
        assert (await state(c))["discard_all"] == 1
        assert (await c.post("/wake_up")).status_code == 200
        assert await state(c) == {"awake": 1, "weights_offloaded": 0, "discard_all": 0}

    asyncio.run(serve(EngineArgs(model=tiny_model_dir("llama"), device="cpu", num_kv_blocks=16,
                                 enable_sleep_mode=True, metrics_names="vllm", kv_cache_metrics=True),
                      scenario))


# -- KV block residency (--kv-cache-metrics) --------------------------------------------------

def test_residency_events_follow_blocks_through_the_block_manager():
    """Every block followed (rate 1): a block taken again ends its life in one event, with its
    hits' gaps; lifetime >= idle; a block never taken again makes none."""
    from tessellm.core.block_manager import BlockManager
    from tessellm.core.request import Request
    from tessellm.metrics.kv_residency import KVResidency

    kv = BlockManager(num_blocks=4, block_size=4)
    kv.residency = KVResidency(1.0)
    params = SamplingParams(max_tokens=1)
    first = Request("a", list(range(9)), params)  # 3 blocks, 2 full ones published
    kv.allocate(first, 9)
    first.num_computed_tokens = 9
    kv.publish_full_blocks(first, 9)
    kv.free(first)
    for rid in ("b", "c"):  # two prefix hits on those 2 blocks
        again = Request(rid, list(range(9)), params)
        prefix = kv.find_cached_prefix(again)
        assert len(prefix) == 2
        kv.allocate(again, 1, prefix)
        kv.free(again)
    # b's and c's last token each took a free block: c took a's partial one, ending its life
    assert [gaps for _, _, gaps in kv.residency.drain()] == [[]]
    other = Request("d", list(range(100, 116)), params)  # 4 blocks: every block taken again
    kv.allocate(other, 16)
    events = kv.residency.drain()
    assert len(events) == 4
    assert sorted(len(gaps) for _, _, gaps in events) == [0, 0, 1, 1]  # a's 2 full blocks: 2 hits, 1 gap
    assert all(life >= idle >= 0 for life, idle, _ in events)


def test_residency_histograms_on_a_real_engine(tiny_model_dir):
    """Off by default (as vLLM's); on, a small KV cache cycled by distinct prompts reports
    lifetimes under vLLM's names and bounds."""
    from tessellm.metrics.reader import Histogram

    small = {**ENGINE, "num_kv_blocks": 8}
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=[i + 1] * 12) for i in range(6)]  # 4 blocks each
    with LLM(tiny_model_dir("llama"), disable_log_stats=False, metrics_names="vllm", **small) as llm:
        llm.generate(prompts[:1], params, use_tqdm=False)
        assert not any("kv_block" in m.name for m in llm.get_metrics())
    with LLM(tiny_model_dir("llama"), disable_log_stats=False, metrics_names="vllm", kv_cache_metrics=True,
             kv_cache_metrics_sample=1.0, **small) as llm:
        for p in prompts:  # one at a time: each takes blocks the ones before held
            llm.generate([p], params, use_tqdm=False)
        h = {m.name: m for m in llm.get_metrics() if isinstance(m, Histogram)}
    life, idle = h["vllm:kv_block_lifetime_seconds"], h["vllm:kv_block_idle_before_evict_seconds"]
    assert life.count == idle.count > 0 and life.sum >= idle.sum
    assert h["vllm:kv_block_reuse_gap_seconds"].count == 0  # no prompt was repeated
    assert "1800.0" in life.buckets and life.labels["engine"] == "0"


def test_bad_residency_sample_rate_is_refused():
    with pytest.raises(ValueError, match="kv_cache_metrics_sample must be in"):
        EngineArgs(model="m", kv_cache_metrics=True, kv_cache_metrics_sample=0).validate()


def test_host_tier_tokens_are_external_kv_transfer(tiny_model_dir):
    """A prompt evicted to the host KV tier (--kv-offloading-size) and asked again: its 40
    cached tokens came from the tier, vLLM's external_kv_transfer, as external_prefix_cache_hits."""
    prompts = [[(7 * i + j) % 500 + 1 for j in range(41)] for i in range(3)]  # 10 full blocks + 1
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    with LLM(tiny_model_dir("llama"), disable_log_stats=False, metrics_names="vllm",
             **{**ENGINE, "num_kv_blocks": 16, "max_model_len": 128}, kv_offloading_size=0.01) as llm:
        for p in prompts:  # 16 blocks hold one prompt: each evicts the one before to the tier
            llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
        out, = llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params, use_tqdm=False)
        v = _values(llm)
    assert out.num_cached_tokens == 40
    assert v[("vllm:prompt_tokens_by_source", "external_kv_transfer")] == 40 == \
        v[("vllm:external_prefix_cache_hits", None)]
    assert v[("vllm:prompt_tokens_by_source", "local_cache_hit")] == 0
    assert v[("vllm:prompt_tokens_by_source", "local_compute")] == 4 * 41 - 40
    assert v[("vllm:prompt_tokens_cached", None)] == 40


def test_data_parallel_engine_reports_residency_and_sleep_state(tiny_model_dir):
    """Two engine cores in their own processes: each message's residency events are observed
    once; the sleep gauge is the whole engine's (no engine label under vLLM's names, as the
    other whole-engine series)."""
    from tessellm.metrics.reader import Histogram

    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    with LLM(tiny_model_dir("llama"), disable_log_stats=False, metrics_names="vllm", data_parallel_size=2,
             kv_cache_metrics=True, kv_cache_metrics_sample=1.0, **{**ENGINE, "num_kv_blocks": 8}) as llm:
        for i in range(8):
            llm.generate([TokensPrompt(prompt_token_ids=[i + 1] * 12)], params, use_tqdm=False)
        metrics = llm.get_metrics()
        again = llm.get_metrics()
    life = [m for m in metrics if m.name == "vllm:kv_block_lifetime_seconds"]
    assert len(life) == 1 and isinstance(life[0], Histogram) and life[0].count > 0
    assert [m.count for m in again if m.name == "vllm:kv_block_lifetime_seconds"] == [life[0].count]
    awake = [m for m in metrics if m.name == "vllm:engine_sleep_state" and m.labels["sleep_state"] == "awake"]
    assert [(m.value, "engine" in m.labels) for m in awake] == [(1, False)]
