"""The host tier of the prefix cache (``kv_offloading_size``, tessellm/core/kv_offload.py):
blocks evicted from a tiny device cache come back from host memory, counted as hits, not
recomputed, with HF transformers' greedy tokens; the tier's LRU order and size; preemption;
the MLA latent cache (fp8 too); one clear error for each bad setting."""

from __future__ import annotations

import dataclasses
import random
import weakref
from types import SimpleNamespace

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tessellm.core.block_manager import BlockManager
from tessellm.core.kv_offload import GIB, LOAD, STORE, HostKVTier
from tessellm.core.request import Request
from tests.conftest import hf_greedy

BS = 4  # tokens per block: a 42-token prompt fills 10 blocks (the 11th is partial)


def _prompts(n: int, length: int = 42, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(length)] for _ in range(n)]


# -- the tier alone (plain Python) ---------------------------------------------------------

def test_host_tier_lru_order_and_size():
    tier = HostKVTier(2)
    tier.store(101, device_block=7)
    tier.store(102, device_block=8)
    tier.store(101, device_block=9)  # held already: most recent now, no second copy
    assert tier.take_transfers() == [(STORE, 7, 0), (STORE, 8, 1)]
    tier.store(103, device_block=5)  # full: evicts the least recently used (102)
    assert 102 not in tier and 101 in tier and 103 in tier and tier.num_used == 2
    assert tier.take_transfers() == [(STORE, 5, 1)]
    tier.load(101, device_block=3)  # a load makes 101 the most recent: 103 goes next
    tier.store(104, device_block=6)
    assert 103 not in tier and list(tier.lru) == [101, 104]
    assert tier.take_transfers() == [(LOAD, 0, 3), (STORE, 6, 1)]
    tier.hold([101, 104])  # both being loaded by the allocation under way: nothing to evict
    tier.store(105, device_block=2)
    assert 105 not in tier and tier.transfers == []
    tier.release()
    assert tier.stats.blocks_stored == 4 and tier.stats.blocks_loaded == 1


def test_block_manager_stores_on_eviction_and_loads_back():
    kv = BlockManager(num_blocks=4, block_size=BS)
    kv.host = HostKVTier(8)
    a = Request("a", list(range(13)), SamplingParams())  # 3 full blocks, 1 partial
    kv.allocate(a, 13)
    a.num_computed_tokens = 13
    kv.publish_full_blocks(a, 13)
    kv.free(a)
    b = Request("b", list(range(100, 116)), SamplingParams())
    kv.allocate(b, 16)  # all four blocks: a's three cached ones are evicted into the tier
    assert [t[0] for t in kv.host.transfers] == [STORE] * 3 and kv.cached.keys().isdisjoint(
        a.block_hashes)
    kv.free(b)
    again = Request("a2", list(range(13)), SamplingParams())
    assert kv.find_cached_prefix(again) == []
    offloaded = kv.find_offloaded(again, 0)
    assert offloaded == again.block_hashes[:3]
    ids = kv.allocate(again, 1, [], offloaded)
    loads = [t for t in kv.host.take_transfers() if t[0] == LOAD]
    assert [t[2] for t in loads] == ids[:3]  # loaded into the request's first three blocks
    assert all(kv.cached[h].block_id == i for h, i in zip(offloaded, ids))  # device-cached now


def test_copy_phases_batch_a_reload_into_one_store_and_one_load():
    """A reload evicts as it loads (store b1, load into b1, store b2, load into b2...): one
    phase, all stores then all loads. A store of a block a load of the phase wrote, or into a
    slot a load of the phase read, opens the next phase; order within each kind is kept."""
    from tessellm.core.kv_offload import copy_phases

    reload = [t for i in range(100) for t in ((STORE, i, 200 + i), (LOAD, i, i))]
    assert copy_phases(reload) == [([(i, 200 + i) for i in range(100)], [(i, i) for i in range(100)])]
    assert copy_phases([(STORE, 1, 0), (LOAD, 5, 1), (STORE, 1, 2), (LOAD, 2, 3)]) == [
        ([(1, 0)], [(5, 1)]), ([(1, 2)], [(2, 3)])]  # block 1 stored again after its load
    assert copy_phases([(LOAD, 3, 7), (STORE, 9, 3), (STORE, 8, 4)]) == [
        ([], [(3, 7)]), ([(9, 3), (8, 4)], [])]  # slot 3 rewritten after its load
    assert copy_phases([(STORE, 1, 0), (STORE, 2, 0), (LOAD, 0, 4)]) == [([(1, 0), (2, 0)], [(0, 4)])]
    assert copy_phases([]) == []


def test_host_buffer_copies_in_bounded_pieces(monkeypatch):
    """A copy call moves at most ``MAX_COPY_BYTES`` of one tensor (its device temporary stays
    small): a reload of 10 blocks, plus a store, with room for 4 a call is 3 store and 3 load
    calls per tensor, and lands as copying pair by pair in order does (a slot written twice
    included)."""
    from tessellm.backends.reference.kv_transfer import swap_blocks
    from tessellm.core import host_kv_buffer
    from tessellm.core.host_kv_buffer import HostKVBuffer

    g = torch.Generator().manual_seed(2)
    caches = [torch.randn(24, BS, 2, 8, generator=g) for _ in range(2)]
    monkeypatch.setattr(host_kv_buffer, "MAX_COPY_BYTES", 4 * BS * 2 * 8 * 4)
    buf = HostKVBuffer(caches, 24, False, lambda n: torch.zeros(n, dtype=torch.uint8))
    assert buf.max_copy_blocks == 4
    transfers = [t for i in range(10) for t in ((STORE, 2 * i, 23 - i), (LOAD, i, 2 * i))]
    transfers.insert(1, (STORE, 23, 23))  # slot 23 rewritten: the later store wins
    want_dev, want_host = [c.clone() for c in caches], [torch.zeros(24, BS, 2, 8) for _ in caches]
    for kind, a, b in transfers:
        for dev, host in zip(want_dev, want_host):
            if kind == STORE:
                host[b] = dev[a]
            else:
                dev[b] = host[a]
    buf.apply(transfers, caches, swap_blocks)
    assert buf.copy_calls == 2 * (3 + 3)
    assert all(torch.equal(c, w) for c, w in zip(caches, want_dev))
    assert all(torch.equal(c.tensors[t], w) for t, w in enumerate(want_host) for c in buf.chunks)


def test_a_block_loaded_twice_from_two_chunks_keeps_the_later_load(monkeypatch):
    """Two loads of one step into one device block, from host slots of different chunks, the
    later slot in the earlier chunk: the later load wins, as listed (the phase's loads are
    copied chunk by chunk, so the second load opens a phase of its own)."""
    from tessellm.backends.reference.kv_transfer import swap_blocks
    from tessellm.core import host_kv_buffer
    from tessellm.core.host_kv_buffer import HostKVBuffer
    from tessellm.core.kv_offload import copy_phases

    # a GPU's chunking (powers of two), in host memory that is not pinned
    monkeypatch.setattr(host_kv_buffer, "_pinned", lambda n: torch.zeros(n, dtype=torch.uint8))
    caches = [torch.zeros(8, BS, 2, 8) for _ in range(2)]
    buf = HostKVBuffer(caches, 10, True, lambda n: torch.zeros(n, dtype=torch.uint8))
    assert len(buf.chunks) > 1 and buf.chunks[1].first_slot <= 9
    for chunk in buf.chunks:
        for t in chunk.tensors:
            for i in range(chunk.num_slots):
                t[i] = chunk.first_slot + i  # each slot holds its number
    transfers = [(LOAD, 9, 3), (LOAD, 0, 3)]  # slot 9 (a later chunk), then slot 0
    assert copy_phases(transfers) == [([], [(9, 3)]), ([], [(0, 3)])]
    buf.apply(transfers, caches, swap_blocks)
    assert all(torch.equal(c[3], torch.zeros(BS, 2, 8)) for c in caches)  # slot 0's, not 9's


def test_reload_step_copies_once_per_cache_tensor(tiny_model_dir):
    """The step that loads P back (10 host hits, each fresh block evicting a cached one into
    the tier) makes one store copy and one load copy per cache tensor (2 layers x K, V), not
    one per block: the structure that keeps a long prompt's load near PCIe bandwidth."""
    model = tiny_model_dir("llama")
    p, q, r = _prompts(3)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=16,
             max_model_len=128, kv_offloading_size=0.01) as llm:
        for x in (p, q, r):
            llm.generate({"prompt_token_ids": x}, params, use_tqdm=False)
        host, buf = llm.engine.core.kv.host, llm.engine.core.runner.host_kv
        stored, calls = host.stats.blocks_stored, buf.copy_calls
        out = llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0]
        assert out.num_cached_tokens == 40 and host.stats.blocks_loaded == 10
        assert host.stats.blocks_stored > stored  # the step stored and loaded
        assert buf.copy_calls - calls == 2 * 4
    assert list(out.outputs[0].token_ids) == hf_greedy(model, [p], 1)[0]


def test_reference_copies_match_pair_by_pair():
    """The reference swap_blocks' three batched paths (one memory; a gather then host runs; host
    runs then a scatter: the last two are the GPU's, run here on host tensors) and its pair-by-pair
    path for a block written twice, against copying pair by pair in order."""
    import torch

    from tessellm.backends.reference.kv_transfer import load_scattered, store_gathered, swap_blocks

    g = torch.Generator().manual_seed(0)
    cache = torch.randn(32, BS, 2, 8, generator=g)
    ids, slots = torch.randperm(32, generator=g)[:12].tolist(), torch.randperm(20, generator=g)[:12].tolist()

    def oracle(src, n, mapping):
        out = torch.zeros((n, *src.shape[1:]))
        for s, d in mapping:
            out[d] = src[s]
        return out

    stores, loads = list(zip(ids, slots)), list(zip(slots[::-1], ids))
    for copy, src, n, mapping in ((swap_blocks, cache, 20, stores), (store_gathered, cache, 20, stores),
                                  (load_scattered, oracle(cache, 20, stores), 32, loads),
                                  (swap_blocks, cache, 20, stores + [(5, slots[0])])):
        out = torch.zeros((n, *src.shape[1:]))
        copy(src, out, mapping)
        assert torch.equal(out, oracle(src, n, mapping))


def test_pinned_host_buffer_comes_in_power_of_two_chunks(monkeypatch):
    """Pinned memory is rounded up to a power of two by torch's allocator, so the buffer asks
    for chunks of exactly a power of two (here at most 4 KiB): what it pins stays within a slot
    a chunk of what it holds; slots map across chunks, and a step's stores and loads through
    them land where copying pair by pair puts them. Host bytes stand in for pinned ones."""
    import torch

    from tessellm.backends.reference.kv_transfer import swap_blocks
    from tessellm.core import host_kv_buffer
    from tessellm.core.host_kv_buffer import HostKVBuffer

    asked = []

    def fake_pinned(nbytes):
        asked.append(nbytes)
        return torch.zeros(nbytes, dtype=torch.uint8)

    monkeypatch.setattr(host_kv_buffer, "MAX_CHUNK", 4096)
    monkeypatch.setattr(host_kv_buffer, "_pinned", fake_pinned)
    g = torch.Generator().manual_seed(0)
    caches = [torch.randn(40, BS, 1, 9, generator=g), torch.randn(40, BS, 2, 8, generator=g)]
    per_slot = 192 + 256  # 4 x 9 floats (144 B) aligned to 64, and 4 x 2 x 8 floats
    buf = HostKVBuffer(caches, 25, pin=True, zeros=None)
    assert all(n & (n - 1) == 0 for n in asked) and len(buf.chunks) > 2
    assert sum(c.num_slots for c in buf.chunks) == 25
    assert sum(asked) < 25 * per_slot + len(asked) * per_slot + 2 * per_slot
    stores = [(i, (7 * i) % 25) for i in range(25)]  # every slot, across every chunk
    loads = [((3 * i) % 25, 39 - i) for i in range(20)]
    transfers = [(STORE, d, s) for d, s in stores] + [(LOAD, s, d) for s, d in loads]
    back = [torch.zeros_like(c) for c in caches]
    buf.apply([t for t in transfers if t[0] == STORE], caches, swap_blocks)
    buf.apply([t for t in transfers if t[0] == LOAD], back, swap_blocks)
    for cache, got in zip(caches, back):
        want = torch.zeros_like(cache)
        host = {s: cache[d] for d, s in stores}
        for s, d in loads:
            want[d] = host[s]
        assert torch.equal(got, want)


def test_runner_round_trip_heads_major_and_latent_caches():
    """The runner's copies over a heads-major cache (IPEX's layout: a transposed view of
    ``[blocks, kv_heads, block_size, head]`` storage) and a latent cache without values (MLA):
    blocks stored, the device cache wiped, loaded back into other blocks, equal."""
    import torch

    from tessellm.core.runner_kv_cache import RunnerKVCache

    g = torch.Generator().manual_seed(0)
    heads_major = SimpleNamespace(k_cache=torch.randn(10, 2, BS, 8, generator=g).transpose(1, 2),
                                  v_cache=torch.randn(10, 2, BS, 8, generator=g).transpose(1, 2))
    latent = SimpleNamespace(k_cache=torch.randn(10, BS, 1, 12, generator=g), v_cache=None)

    class Runner(RunnerKVCache):
        device = torch.device("cpu")

        def kv_layers(self):
            return [heads_major, latent]

    runner = Runner()
    runner.allocate_host_kv_cache(6)
    before = [t.clone() for t in (heads_major.k_cache, heads_major.v_cache, latent.k_cache)]
    runner.apply_kv_transfers([(STORE, 7, 0), (STORE, 2, 5), (STORE, 3, 1)])
    for t in (heads_major.k_cache, heads_major.v_cache, latent.k_cache):
        t.zero_()
    runner.apply_kv_transfers([(LOAD, 0, 9), (LOAD, 5, 0), (LOAD, 1, 4)])
    for old, new in zip(before, (heads_major.k_cache, heads_major.v_cache, latent.k_cache)):
        for src, dst in ((7, 9), (2, 0), (3, 4)):
            assert torch.equal(new[dst], old[src])
        assert not new[7].any()  # only the loaded blocks came back


# -- the engine ----------------------------------------------------------------------------

def _run(model: str, order: list[list[int]], max_tokens: int = 6, **engine):
    """Each prompt alone, in order, on a 16-block device cache; per prompt its tokens, its
    cached tokens and the tokens the scheduler computed for it; and the engine core."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    rows = []
    with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=16,
             max_model_len=128, **engine) as llm:
        sched = llm.engine.core.scheduler
        for p in order:
            before = sched.num_scheduled_tokens_total
            out = llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0]
            rows.append((list(out.outputs[0].token_ids), out.num_cached_tokens,
                         sched.num_scheduled_tokens_total - before))
        return rows, llm.engine.core


def test_evicted_prompt_comes_back_from_the_host_tier(tiny_model_dir):
    """P, then two prompts that evict all of P's blocks from the 16-block cache, then P again:
    its first 40 tokens are host hits (10 blocks loaded, none computed), and every output is
    HF's and the same as without the tier."""
    model = tiny_model_dir("llama")
    p, q, r = _prompts(3)
    order = [p, q, r, p]
    plain, plain_core = _run(model, order)
    rows, core = _run(model, order, kv_offloading_size=0.01)
    kv = core.kv
    assert [t for t, _, _ in rows] == [t for t, _, _ in plain] == hf_greedy(model, order, 6)
    assert plain[3][1] == 0 and plain_core.kv.host is None  # without the tier: recomputed
    assert rows[3][1] == 40  # cached tokens of the last request: all from the host
    assert rows[3][2] == 42 - 40 + 5  # computed: 2 prompt tokens, then 5 decodes
    stats = kv.host.stats
    assert stats.hits == 40 and stats.blocks_loaded == 10 and kv.stats.hits == 0
    assert stats.queries == 4 * 42 and stats.blocks_stored >= 10
    assert stats.bytes_loaded == 10 * stats.bytes_per_block
    assert stats.bytes_per_block == 2 * 2 * BS * 2 * 16 * 4  # layers, K+V, tokens, kv heads, head, fp32
    # The metrics, from the scheduler's stats as the engine process sends them (vLLM's names).
    from prometheus_client import CollectorRegistry

    from tessellm.metrics.prometheus import EngineMetrics
    from tessellm.metrics.stats import EngineStats

    metrics = EngineMetrics("m", CollectorRegistry())
    metrics.observe_stats(EngineStats.from_dict(dataclasses.asdict(core.scheduler.stats())))
    text = metrics.render().decode()
    assert 'tessellm:external_prefix_cache_hits_total{model_name="m"} 40.0' in text
    assert 'tessellm:external_prefix_cache_queries_total{model_name="m"} 168.0' in text
    assert (f'tessellm:kv_offload_total_bytes_total{{model_name="m",transfer_type="CPU_to_GPU"}} '
            f'{float(stats.bytes_loaded)}') in text
    assert (f'tessellm:kv_offload_total_bytes_total{{model_name="m",transfer_type="GPU_to_CPU"}} '
            f'{float(stats.bytes_stored)}') in text
    assert "tessellm:external_prefix_cache_hits_total" not in _render_without_tier()


def test_data_parallel_cores_merge_their_tiers_counts():
    from tessellm.metrics.stats import EngineStats, merge_engine_stats

    a = dict(queries=10, hits=4, bytes_stored=100, bytes_loaded=40, usage=0.5)
    b = dict(queries=6, hits=0, bytes_stored=50, bytes_loaded=0, usage=0.25)
    merged = merge_engine_stats([EngineStats(kv_offload=a), EngineStats(kv_offload=b)])
    assert merged.kv_offload == dict(queries=16, hits=4, bytes_stored=150, bytes_loaded=40,
                                     usage=0.375)
    assert merge_engine_stats([EngineStats(), EngineStats()]).kv_offload is None


def _render_without_tier() -> str:
    from prometheus_client import CollectorRegistry

    from tessellm.metrics.prometheus import EngineMetrics
    from tessellm.metrics.stats import EngineStats

    metrics = EngineMetrics("m", CollectorRegistry())
    metrics.observe_stats(EngineStats())
    return metrics.render().decode()


@pytest.mark.parametrize("engine", [
    # ~30 s each on 2 cores (two worker processes); the one-rank variants cover the rest
    pytest.param(dict(tensor_parallel_size=2), marks=pytest.mark.slow, id="tp2"),
    pytest.param(dict(pipeline_parallel_size=2), marks=pytest.mark.slow, id="pp2"),
    pytest.param(dict(async_scheduling=True), id="async"),
])
def test_host_tier_under_parallelism_and_async_scheduling(engine, tiny_model_dir):
    """Two tensor-parallel ranks (gloo), each storing and loading its own shard (one KV head of
    two); two pipeline stages, each its own layer; the tier sized over both ranks. Or async
    scheduling, the next step's copies queued behind the step in flight. The evicted prompt
    comes back from the host tier with HF's tokens."""
    model = tiny_model_dir("llama")
    p, q, r = _prompts(3)
    order = [p, q, r, p]
    rows, core = _run(model, order, kv_offloading_size=0.01, **engine)
    assert [t for t, _, _ in rows] == hf_greedy(model, order, 6)
    assert rows[3][1] == 40 and rows[3][2] == 7 and core.kv.host.stats.blocks_loaded == 10
    assert core.kv.host.stats.bytes_per_block == 2 * 2 * BS * 2 * 16 * 4  # both ranks' parts


def test_warm_up_leaves_no_host_tier_counts(tiny_model_dir):
    """Kernel warm-up's synthetic prompts are looked up in the tier (8 queried tokens here),
    but its counters start at zero for the user, as the prefix cache's do."""
    with LLM(tiny_model_dir("llama"), device="cpu", block_size=BS, num_kv_blocks=24,
             max_model_len=64, kernel_warmup=True, kv_offloading_size=0.01) as llm:
        stats = llm.engine.core.scheduler.stats()
        assert llm.engine.warmup.requests >= 1
        assert stats.kv_offload == {"queries": 0, "hits": 0, "bytes_stored": 0, "bytes_loaded": 0,
                                    "usage": stats.kv_offload["usage"]}


def test_host_tier_size_limit_and_lru(tiny_model_dir):
    """A tier of exactly 12 blocks (its size in GiB) never holds more and keeps the most
    recently evicted blocks. P's blocks leave the device tail first (its first blocks, the most
    shared, last), so its head is still in the tier after q's and r's evictions and its tail is
    not: P comes back in part, less than the 40 tokens a big tier serves."""
    model = tiny_model_dir("llama")
    p, q, r = _prompts(3)
    per_block = 2 * 2 * BS * 2 * 16 * 4
    rows, core = _run(model, [p, q, r, p], kv_offloading_size=12 * per_block / GIB)
    kv = core.kv
    assert kv.host.num_blocks == 12 and kv.host.num_used == 12
    assert kv.host.stats.blocks_stored > 12  # it evicted its own least recently used
    assert 0 < rows[3][1] < 40 and kv.host.stats.hits == rows[3][1]
    assert rows[3][2] == 42 - rows[3][1] + 5  # the rest of the prompt is recomputed


def test_preemption_with_the_host_tier(tiny_model_dir):
    """Two requests that outgrow a 16-block cache together preempt each other; the preempted
    one's evicted blocks come back from the host tier when it resumes, and both give HF's
    tokens."""
    model = tiny_model_dir("llama")
    batch = _prompts(2, length=30, seed=1)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=16,
             max_model_len=128, kv_offloading_size=0.01) as llm:
        outs = llm.generate([{"prompt_token_ids": t} for t in batch], params, use_tqdm=False)
        core = llm.engine.core
        assert core.scheduler.num_preemptions_total > 0
        assert core.kv.host.stats.blocks_loaded > 0
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_greedy(model, batch, 24)


def test_shared_prefixes_under_pressure(tiny_model_dir):
    """Eight prompts over three shared heads, four running at once in 8-token chunks on a
    20-block cache, twice: steps mix evictions, stores and loads (a head loaded once and shared
    by the requests after it in the step; a preemption too, at the time of writing). HF's
    tokens every time."""
    model = tiny_model_dir("llama")
    heads = _prompts(3, length=24, seed=4)
    tails = _prompts(8, length=5, seed=5)
    batch = [heads[i % 3] + tails[i] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = hf_greedy(model, batch, 8)
    with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=20,
             max_model_len=64, max_num_seqs=4, max_num_batched_tokens=8,
             kv_offloading_size=0.01) as llm:
        for _ in range(2):
            outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
            assert [list(o.outputs[0].token_ids) for o in outs] == want
        host = llm.engine.core.kv.host
        assert host.stats.blocks_loaded > 0 and host.stats.hits > 0


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_mla_latent_cache_offloads(kv_cache_dtype, tmp_path):
    """DeepSeek-V3's latent cache (one row a token, no value cache), in float32 and fp8: the
    evicted prompt comes back from the host tier with the tokens of a run without the tier
    (and HF's in float32)."""
    from tests.models.test_deepseek import deepseek_config, save_deepseek
    from tests.models.variant_parity import hf_reference

    path = save_deepseek(deepseek_config(True, q_lora_rank=24), str(tmp_path / "ds"))
    p, q, r = [[t % 128 for t in x] for x in _prompts(3)]
    order = [p, q, r, p]
    engine = dict(kv_cache_dtype=kv_cache_dtype)
    plain, _ = _run(path, order, 4, **engine)
    rows, core = _run(path, order, 4, kv_offloading_size=0.01, **engine)
    kv = core.kv
    assert [t for t, _, _ in rows] == [t for t, _, _ in plain]
    if kv_cache_dtype == "auto":
        assert [t for t, _, _ in rows] == hf_reference(path, order, 4)[0]
    assert rows[3][1] == 40 and kv.host.stats.blocks_loaded == 10


@pytest.mark.parametrize("settings, match", [
    (dict(kv_offloading_size=0), "positive number of GiB"),
    (dict(kv_offloading_size=-2.0), "positive number of GiB"),
    (dict(kv_offloading_size=float("nan")), "positive number of GiB"),
    (dict(kv_offloading_size="4"), "positive number of GiB"),
    (dict(kv_offloading_size=4, kv_offloading_backend="lmcache"), "use 'native'"),
    (dict(kv_offloading_backend="native"), "kv_offloading_size is not"),
    (dict(kv_offloading_size=4, enable_prefix_caching=False), "enable_prefix_caching is off"),
])
def test_bad_settings_are_one_clear_error(settings, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(**settings).validate()


def test_too_small_a_tier_mean_pooling_and_recurrent_models_are_refused(tiny_model_dir):
    from tessellm.models.state_space import check_engine_args

    with pytest.raises(ValueError, match="holds no KV block"):
        LLM(tiny_model_dir("llama"), device="cpu", num_kv_blocks=16, kv_offloading_size=1e-9)
    with pytest.raises(ValueError, match="prefix caching is off for this model"):
        LLM(tiny_model_dir("llama"), device="cpu", num_kv_blocks=16, runner="pooling",
            pooler_config={"pooling_type": "MEAN"}, kv_offloading_size=1)  # reads every position
    mamba = SimpleNamespace(architectures=["Mamba2ForCausalLM"])
    with pytest.raises(ValueError, match="does not support KV offloading"):
        check_engine_args(EngineArgs(kv_offloading_size=1.0), mamba)


def test_shutdown_drops_the_host_tier_before_emptying_the_host_cache(tiny_model_dir, monkeypatch):
    """After stores and loads, ``shutdown`` leaves no reference to the tier's buffer by the
    time it empties torch's host cache (a pinned block still referenced then stays pinned for
    the process's life), and it empties it on every device (a no-op on cpu)."""
    import tessellm.distributed.worker as worker_module

    p, q, r = _prompts(3)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm = LLM(tiny_model_dir("llama"), device="cpu", block_size=BS, num_kv_blocks=16,
              max_model_len=64, kv_offloading_size=0.01)
    for prompt in (p, q, r, p):
        llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    assert llm.engine.core.kv.host.stats.blocks_loaded > 0
    buffer = llm.engine.core.runner.host_kv
    refs = [weakref.ref(buffer)] + [weakref.ref(t) for c in buffer.chunks for t in c.tensors]
    del buffer
    alive_then = []
    empty = worker_module._empty_host_cache
    monkeypatch.setattr(worker_module, "_empty_host_cache",
                        lambda device: alive_then.append(sum(r() is not None for r in refs))
                        or empty(device))
    llm.shutdown()
    assert alive_then == [0]


def test_host_cache_is_emptied_on_a_torch_without_the_accelerator_api(monkeypatch):
    """torch 2.11 (the H100 image's) has no ``torch.accelerator.empty_host_cache``; its CUDA
    host allocator is emptied through ``torch._C._host_emptyCache`` then."""
    from tessellm.distributed.worker import _empty_host_cache

    calls = []
    monkeypatch.delattr(torch.accelerator, "empty_host_cache", raising=False)
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: calls.append("cuda"), raising=False)
    _empty_host_cache(torch.device("cpu"))
    _empty_host_cache(torch.device("cuda", 0))
    assert calls == ["cuda"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned host memory)")
def test_shutdown_gives_the_pinned_host_tier_back(tiny_model_dir):
    """The tier's pinned chunks leave torch's caching host allocator at shutdown (it keeps
    freed pinned blocks for reuse otherwise: an engine made and shut down in one process)."""
    def pinned() -> int:
        return torch.cuda.memory.host_memory_stats().get("allocated_bytes.current", 0)

    before = pinned()
    llm = LLM(tiny_model_dir("llama"), device="cuda", num_kv_blocks=16, kv_offloading_size=0.25)
    assert pinned() - before >= 0.2 * (1 << 30)
    llm.shutdown()
    assert pinned() - before < 0.05 * (1 << 30)
