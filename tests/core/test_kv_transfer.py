"""KV connectors (``kv_transfer_config``, tessellm/kv_transfer): the shared-storage connector
gives disaggregated prefill in one process: a producer engine prefills and saves its blocks as
files, a consumer engine loads them and decodes, with HF transformers' greedy tokens and the
tokens of a run without a connector; partial hits, corrupt and missing files (a miss or a
recompute, never a crash or a wrong token), every cache layout, and one clear error for each
bad setting."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
import threading
import time
import types
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tessellm.kv_transfer import (KVConnectorBase, KVConnectorContext, KVConnectorRole,
                                  KVTransferConfig, make_connector, parse_kv_transfer_config,
                                  register_kv_connector)
from tessellm.kv_transfer.shared_storage import HEADER_BYTES, SharedStorageConnector
from tests.conftest import hf_greedy

BS = 4  # tokens per block: a 42-token prompt fills 10 blocks; 40 tokens can be loaded


def _prompts(n: int, length: int = 42, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(length)] for _ in range(n)]


def _kv(path, role: str) -> dict:
    return {"kv_connector": "SharedStorageConnector", "kv_role": role,
            "kv_connector_extra_config": {"shared_storage_path": str(path)}}


def _run(model: str, prompts: list[list[int]], max_tokens: int = 6, **engine):
    """Each prompt alone, in order; per prompt its tokens, cached tokens and the tokens the
    scheduler computed for it; and the scheduler's stats."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    rows = []
    with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=32,
             max_model_len=128, **engine) as llm:
        sched = llm.engine.core.scheduler
        for p in prompts:
            before = sched.num_scheduled_tokens_total
            out = llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0]
            rows.append((list(out.outputs[0].token_ids), out.num_cached_tokens,
                         sched.num_scheduled_tokens_total - before))
        return rows, sched.stats()


def _files(path) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize("load_async", [True, False], ids=["background", "in-step"])
def test_producer_saves_and_consumer_loads(load_async, tiny_model_dir, tmp_path):
    """Disaggregated prefill: the producer computes two prompts (one block file each per full
    block); the consumer loads their 40 tokens (10 blocks), in the background or in the step
    that admits them, computes 2 prompt tokens and 5 decodes each, and gives HF's tokens, the
    producer's and a plain run's."""
    model = tiny_model_dir("llama")
    prompts = _prompts(2)
    want = hf_greedy(model, prompts, 6)
    made, made_stats = _run(model, prompts, kv_transfer_config=_kv(tmp_path, "kv_producer"))
    # Full blocks of known tokens: the 10 prompt blocks and, once 6 tokens are out, block 11
    # (tokens 44..47; 47 is the last output, never fed back: not computed, not saved).
    assert len(_files(tmp_path)) == 2 * 11
    assert made_stats.kv_connector["blocks_saved"] == 2 * 11 and made_stats.kv_connector["hits"] == 0
    consumer = _kv(tmp_path, "kv_consumer")
    consumer["kv_connector_extra_config"]["load_async"] = load_async
    used, stats = _run(model, prompts, kv_transfer_config=consumer)
    assert [t for t, _, _ in used] == [t for t, _, _ in made] == want
    assert [(c, n) for _, c, n in used] == [(40, 2 + 5)] * 2
    assert stats.kv_connector == dict(queries=2 * 42, hits=2 * 40, blocks_loaded=20, blocks_saved=0,
                                      save_failures=0, load_failures=0, lookup_timeouts=0,
                                      store_down=0, lookups_skipped=0, saves_skipped=0,
                                      remote_prefill_fallbacks=0)
    assert len(_files(tmp_path)) == 2 * 11  # a consumer writes nothing
    # The metrics, from the scheduler's stats as the engine process sends them.
    from prometheus_client import CollectorRegistry

    from tessellm.metrics.prometheus import EngineMetrics
    from tessellm.metrics.stats import EngineStats, merge_engine_stats

    metrics = EngineMetrics("m", CollectorRegistry())
    metrics.observe_stats(EngineStats.from_dict(dataclasses.asdict(stats)))
    text = metrics.render().decode()
    assert 'tessellm:kv_connector_hits_total{model_name="m"} 80.0' in text
    assert 'tessellm:kv_connector_blocks_loaded_total{model_name="m"} 20.0' in text
    two = merge_engine_stats([EngineStats(kv_connector=stats.kv_connector)] * 2)  # -dp 2
    assert two.kv_connector["hits"] == 160


def test_partial_hit_and_kv_both(tiny_model_dir, tmp_path):
    """A prompt sharing its first 6 blocks with a saved one loads those 24 tokens and computes
    the rest; with kv_both the second engine saves the blocks it computed, so a third engine
    loads all of it."""
    model = tiny_model_dir("llama")
    p, q = _prompts(2)
    mixed = p[:24] + q[24:]
    want = hf_greedy(model, [mixed], 6)
    _run(model, [p], kv_transfer_config=_kv(tmp_path, "kv_producer"))
    rows, stats = _run(model, [mixed], kv_transfer_config=_kv(tmp_path, "kv_both"))
    assert rows == [(want[0], 24, 42 - 24 + 5)] and stats.kv_connector["hits"] == 24
    rows, _ = _run(model, [mixed], kv_transfer_config=_kv(tmp_path, "kv_consumer"))
    assert rows == [(want[0], 40, 2 + 5)]


def test_corrupt_truncated_and_missing_files(tiny_model_dir, tmp_path):
    """A truncated file is a miss at lookup (the blocks before it load); a file whose bytes
    were flipped passes lookup, fails its checksum on the worker, and the request is
    recomputed from scratch; a missing directory is an empty store. HF's tokens every time."""
    model = tiny_model_dir("llama")
    p, q = _prompts(2)
    want = hf_greedy(model, [p, q], 6)
    _run(model, [p, q], kv_transfer_config=_kv(tmp_path, "kv_producer"))
    (ns,) = os.listdir(tmp_path)
    conn = _connector(tmp_path, ns)
    keys_p = conn.block_keys(SimpleNamespace(request_id="p", all_token_ids=p,
                                             lora_request=None, block_key=lambda a, b, lora: None))
    keys_q = conn.block_keys(SimpleNamespace(request_id="q", all_token_ids=q,
                                             lora_request=None, block_key=lambda a, b, lora: None))
    with open(conn.path(keys_p[4], 0), "r+b") as f:  # block 4 of p: cut short
        f.truncate(os.path.getsize(f.name) - 8)
    _flip_byte(conn.path(keys_q[7], 0), 5, 0xFF)  # block 7 of q: one payload byte flipped
    rows, stats = _run(model, [p, q], kv_transfer_config=_kv(tmp_path, "kv_consumer"))
    assert [t for t, _, _ in rows] == want
    assert rows[0][1:] == (16, 42 - 16 + 5)  # blocks 0..3 loaded
    assert rows[1][1:] == (0, 42 + 5)  # its background load failed: all recomputed, no step lost
    # Exact: each prompt looked up once (q's recompute is no second query); q's failed load
    # gives no hit and no loaded block.
    assert stats.kv_connector == dict(queries=2 * 42, hits=16, blocks_loaded=4, blocks_saved=0,
                                      save_failures=0, load_failures=1, lookup_timeouts=0,
                                      store_down=0, lookups_skipped=0, saves_skipped=0,
                                      remote_prefill_fallbacks=0)
    assert not os.path.exists(conn.path(keys_q[7], 0))  # the corrupt file is gone
    _run(model, [q], kv_transfer_config=_kv(tmp_path, "kv_producer"))  # ... and saved afresh
    rows, _ = _run(model, [q], kv_transfer_config=_kv(tmp_path, "kv_consumer"))
    assert rows == [(want[1], 40, 2 + 5)]
    rows, _ = _run(model, [p], kv_transfer_config=_kv(tmp_path / "absent", "kv_consumer"))
    assert rows == [(want[0], 0, 42 + 5)]


@pytest.mark.parametrize("load_async", [False, True], ids=["in-step", "background"])
def test_a_failed_load_keeps_the_first_schedule_stamps(load_async, tiny_model_dir, tmp_path):
    """A request whose load fails is admitted again to recompute its prompt: its
    RequestOutput.metrics keep the first admission's scheduled_ts and first_scheduled_time
    (vLLM's "first scheduled"), not the second's."""
    model = tiny_model_dir("llama")
    (p,) = _prompts(1)
    _run(model, [p], kv_transfer_config=_kv(tmp_path, "kv_producer"))
    (ns,) = os.listdir(tmp_path)
    conn = _connector(tmp_path, ns)
    keys = conn.block_keys(SimpleNamespace(request_id="p", all_token_ids=p, lora_request=None,
                                           block_key=lambda a, b, lora: None))
    _flip_byte(conn.path(keys[7], 0), 5, 0xFF)  # a payload byte flipped: the load fails
    kv = _kv(tmp_path, "kv_consumer")
    kv["kv_connector_extra_config"]["load_async"] = load_async
    with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=32,
             max_model_len=128, kv_transfer_config=kv) as llm:
        engine, sched = llm.engine, llm.engine.core.scheduler
        engine.add_request("r", {"prompt_token_ids": p},
                           SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        outs = []
        for _ in range(50):  # its first admission (a busy machine's lookup may take a step more)
            outs += engine.step()
            if sched.requests["r"].scheduled_ts is not None:
                break
        first = (sched.requests["r"].scheduled_ts, sched.requests["r"].first_scheduled_time)
        assert first[0] is not None
        while engine.has_unfinished_requests():
            outs += engine.step()
        assert sched.stats().kv_connector["load_failures"] == 1
    metrics = outs[-1].metrics
    assert outs[-1].finished and outs[-1].num_cached_tokens == 0
    assert (metrics.scheduled_ts, metrics.first_scheduled_time) == first
    assert metrics.queued_ts <= metrics.scheduled_ts <= metrics.first_token_ts


@pytest.mark.parametrize("engine", [{}, dict(async_scheduling=True, max_num_batched_tokens=8)],
                         ids=["whole", "async-chunks"])
def test_blocks_computed_over_a_failed_load_are_never_saved(engine, tiny_model_dir, tmp_path):
    """A kv_both engine loading in the step (load_async false) whose load fails (a flipped
    byte in block 3): the same step computes the prompt's next blocks over the failed load's
    garbage, and under async scheduling in chunks of 8 so does the step after it (scheduled
    before the failure was known); they must not be saved (their files would be named by the
    right tokens and served to every later engine). It recomputes them and saves them right,
    so a consumer then loads all of the prompt's blocks and gives HF's tokens."""
    model = tiny_model_dir("llama")
    p = _prompts(1)[0]
    longer = p[:40] + _prompts(1, length=20, seed=7)[0]  # 15 blocks; p's first 10 on disk
    want = hf_greedy(model, [longer], 6)
    _run(model, [p], kv_transfer_config=_kv(tmp_path, "kv_producer"))
    (ns,) = os.listdir(tmp_path)
    conn = _connector(tmp_path, ns)
    keys = conn.block_keys(SimpleNamespace(request_id="x", all_token_ids=longer,
                                           lora_request=None, block_key=lambda a, b, lora: None))
    _flip_byte(conn.path(keys[3], 0), 9, 0x5A)
    both = _kv(tmp_path, "kv_both")
    both["kv_connector_extra_config"]["load_async"] = False
    rows, stats = _run(model, [longer], kv_transfer_config=both, **engine)
    assert rows[0][:2] == (want[0], 0) and stats.kv_connector["load_failures"] == 1
    # Saves count as done (not as offered): the recompute's 15 prompt blocks and its decode
    # block (60..63), each written or found there; the blocks computed over the failed load
    # were dropped, neither saved nor failed.
    assert (stats.kv_connector["blocks_saved"], stats.kv_connector["save_failures"]) == (16, 0)
    if not engine:  # the failed step computed its 20 tokens (dropped), then all 60 again
        assert rows[0][2] == 20 + 60 + 5
    # The blocks past p's hold what a producer that computed the prompt cleanly saves (the
    # tiny model's greedy tokens would not show the difference).
    _run(model, [longer], kv_transfer_config=_kv(tmp_path / "clean", "kv_producer"))
    for key in keys[10:15]:
        got, ref = (np.fromfile(os.path.join(root, ns, f"{key}.r0.kv"), np.float32,
                                offset=HEADER_BYTES) for root in (tmp_path, tmp_path / "clean"))
        assert np.allclose(got, ref, atol=1e-5), key  # saved over the failed load: off by ~3e-2
    rows, _ = _run(model, [longer], kv_transfer_config=_kv(tmp_path, "kv_consumer"))
    assert rows == [(want[0], 56, 4 + 5)]


def test_with_the_host_tier(tiny_model_dir, tmp_path):
    """The connector behind the host tier (--kv-offloading-size) on a 16-block device cache:
    P is loaded from files first; evicted by Q and R, it comes back from the host tier, not
    from the files; HF's tokens."""
    model = tiny_model_dir("llama")
    p, q, r = _prompts(3)
    order = [p, q, r, p]
    _run(model, [p], kv_transfer_config=_kv(tmp_path, "kv_producer"))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=16,
             max_model_len=128, kv_offloading_size=0.01,
             kv_transfer_config=_kv(tmp_path, "kv_consumer")) as llm:
        outs = [llm.generate({"prompt_token_ids": x}, params, use_tqdm=False)[0] for x in order]
        core = llm.engine.core
        host, conn = core.kv.host.stats, core.scheduler.stats().kv_connector
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_greedy(model, order, 6)
    assert [o.num_cached_tokens for o in outs] == [40, 0, 0, 40]
    assert conn["hits"] == 40 and host.hits == 40 and host.blocks_loaded == 10


class GatedStorage(SharedStorageConnector):
    """The shared-storage connector whose background loads start when the test opens a gate,
    as on a slow disk: the engine must run other requests meanwhile."""

    gate = threading.Event()

    def _load_in_background(self, rid, pairs, after):
        GatedStorage.gate.wait(60)
        super()._load_in_background(rid, pairs, after)


@pytest.mark.parametrize("corrupt", [False, True], ids=["loads", "fails"])
def test_background_load_while_other_requests_run(corrupt, tiny_model_dir, tmp_path):
    """A consumer engine with four requests; p's prompt is in the store and loads in the
    background (held until q and r have finished: they are admitted, prefilled and decoded to
    the end meanwhile, r queued behind it too). Then it loads (40 cached tokens) or, its file
    corrupt, fails and is recomputed from its tokens; every request gives HF's tokens. a, also
    in the store, is aborted while it loads: its blocks come back once its load ends."""
    model = tiny_model_dir("llama")
    p, q, r, a = _prompts(4)
    want = dict(zip("pqr", hf_greedy(model, [p, q, r], 8)))
    _run(model, [p, a], kv_transfer_config=_kv(tmp_path, "kv_producer"))
    if corrupt:
        (ns,) = os.listdir(tmp_path)
        keys = _connector(tmp_path, ns).block_keys(SimpleNamespace(
            request_id="p", all_token_ids=p, lora_request=None, block_key=lambda a, b, lora: None))
        _flip_byte(_connector(tmp_path, ns).path(keys[5], 0), 7, 0x21)
    register_kv_connector("GatedStorage", f"{__name__}:GatedStorage")
    GatedStorage.gate.clear()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kv = {**_kv(tmp_path, "kv_consumer"), "kv_connector": "GatedStorage"}
    outs, done_while_loading, aborted_while_loading, totals = {}, None, False, []
    with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=64,
             max_model_len=128, kv_transfer_config=kv) as llm:
        engine, sched = llm.engine, llm.engine.core.scheduler
        for rid, prompt in (("q", q), ("p", p), ("a", a), ("r", r)):
            engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        for _ in range(400):
            if not engine.has_unfinished_requests():
                break
            outs.update((o.request_id, o) for o in engine.step() if o.finished)
            totals.append(sched.stats().kv_connector)
            if "a" in engine.outputs.states and any(r.kv_loading for r in sched.requests.values()
                                                    if r.prompt_token_ids == a):
                engine.abort_request("a")  # while loading: its blocks wait for the load's end
                aborted_while_loading = True
            if done_while_loading is None and {"q", "r"} <= set(outs):
                done_while_loading = "p" in sched.kv_loading and "p" not in outs
                GatedStorage.gate.set()
        stats = sched.stats().kv_connector
    GatedStorage.gate.set()
    assert done_while_loading and aborted_while_loading  # q and r ran to the end while p's load was held
    outs.pop("a", None)
    assert {rid: list(o.outputs[0].token_ids) for rid, o in outs.items()} == want
    assert outs["p"].num_cached_tokens == (0 if corrupt else 40)
    # Each request looked up once (p recomputed after its failed load is no second query);
    # p's failed load, and a's (aborted before it ran), count no hit and no block.
    assert stats == dict(queries=4 * 42, hits=40 * (1 - corrupt), blocks_loaded=10 * (1 - corrupt),
                         blocks_saved=0, save_failures=0, load_failures=int(corrupt),
                         lookup_timeouts=0, store_down=0, lookups_skipped=0, saves_skipped=0,
                         remote_prefill_fallbacks=0)
    # Running totals only grow (the metrics feed counters their differences).
    assert all(a[k] <= b[k] for a, b in zip(totals, totals[1:]) for k in a)
    assert not sched.kv_loading and sched.kv.num_free_blocks == 64  # every block given back


def test_sleep_mode_gives_the_connector_the_new_cache(tiny_model_dir, tmp_path):
    """Sleep mode frees the KV cache (the connector keeps no reference to it: its memory is
    given back) and wake_up allocates it anew: the connector's worker half loads into the new
    tensors (HF's tokens, 40 cached), not the old ones."""
    model = tiny_model_dir("llama")
    p = _prompts(1)[0]
    _run(model, [p], kv_transfer_config=_kv(tmp_path, "kv_producer"))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=32,
             max_model_len=128, enable_sleep_mode=True,
             kv_transfer_config=_kv(tmp_path, "kv_consumer")) as llm:
        old = [weakref.ref(a.k_cache) for a in llm.engine.core.runner.kv_layers()]
        llm.sleep(1)
        gc.collect()
        assert all(ref() is None for ref in old)
        llm.wake_up()
        out = llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0]
    assert (list(out.outputs[0].token_ids), out.num_cached_tokens) == (hf_greedy(model, [p], 6)[0], 40)


def test_a_cache_too_small_for_a_running_request_and_a_loaded_one(tiny_model_dir, tmp_path):
    """16 blocks: q runs (5 prompt blocks, growing to 10) while p's load (10 blocks) is held:
    q waits instead of ending as if it outgrew the cache; once p is loaded and waits to run,
    it gives its blocks back to q (nothing preempted, nothing lost), loads again once q is
    done and both give HF's tokens."""
    model = tiny_model_dir("llama")
    p, q = _prompts(2)[0], _prompts(1, length=20, seed=5)[0]
    want = hf_greedy(model, [p, q], 20)
    _run(model, [p], kv_transfer_config=_kv(tmp_path, "kv_producer"))
    register_kv_connector("GatedStorage", f"{__name__}:GatedStorage")
    GatedStorage.gate.clear()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    kv = {**_kv(tmp_path, "kv_consumer"), "kv_connector": "GatedStorage"}
    outs, stalled = {}, 0
    with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=16,
             max_model_len=128, kv_transfer_config=kv) as llm:
        engine, sched = llm.engine, llm.engine.core.scheduler
        engine.add_request("q", {"prompt_token_ids": q}, params)
        engine.step()
        engine.add_request("p", {"prompt_token_ids": p}, params)
        for _ in range(400):
            if not engine.has_unfinished_requests():
                break
            before = sched.num_scheduled_tokens_total
            outs.update((o.request_id, o) for o in engine.step() if o.finished)
            if sched.kv_loading and sched.num_scheduled_tokens_total == before:
                stalled += 1  # q found no block while p's load holds 11
                GatedStorage.gate.set()
        stats = sched.stats()
    GatedStorage.gate.set()
    assert stalled and stats.num_preemptions_total == 0
    assert {rid: list(o.outputs[0].token_ids) for rid, o in outs.items()} == {"p": want[0], "q": want[1]}
    # p is admitted twice (it gave its loaded blocks back): two lookups of its 42 tokens, two
    # loads: its second admission loads again what q's blocks evicted (the rest is a device
    # hit) and those hits count too (each loaded block: 4 tokens).
    conn = stats.kv_connector
    assert (conn["queries"], conn["load_failures"]) == (42 + 20 + 42, 0)
    assert conn["blocks_loaded"] >= 10 and conn["hits"] == BS * conn["blocks_loaded"]


def _connector(path, namespace: str, role=KVConnectorRole.SCHEDULER, **extra) -> SharedStorageConnector:
    config = parse_kv_transfer_config(_kv(path, "kv_both"))
    config.kv_connector_extra_config.update(extra)
    return SharedStorageConnector(config, role, KVConnectorContext(BS, namespace))


def _flip_byte(path: str, from_end: int, mask: int) -> None:
    """XOR one byte of a block file, ``from_end`` bytes before its end (a payload byte: the
    load's checksum fails)."""
    with open(path, "r+b") as f:
        f.seek(-from_end, os.SEEK_END)
        byte = f.read(1)
        f.seek(-from_end, os.SEEK_END)
        f.write(bytes([byte[0] ^ mask]))


@pytest.mark.parametrize("checksum", ["sum64", "crc32", "none"])
def test_worker_half_round_trip_over_every_cache_layout(checksum, tmp_path, monkeypatch):
    """The worker half over a heads-major cache (IPEX's: a transposed view), a latent cache
    without values (MLA) and an fp8 cache, with each checksum, through staging chunks of 2
    blocks: blocks saved (over the writer pool; a block already saved is not written again),
    the caches wiped, loaded into other blocks in
    the step and in the background, equal byte for byte, no staging buffer made past the
    limit; a block of another layout is refused (a failed load); a flipped payload byte fails
    the load unless unchecked."""
    from tessellm.backends.reference.kv_transfer import swap_blocks
    from tessellm.kv_transfer import shared_storage_worker

    monkeypatch.setattr(shared_storage_worker, "_CHUNK_BLOCKS", 2)

    g = torch.Generator().manual_seed(0)
    heads_major = torch.randn(10, 2, BS, 8, generator=g).transpose(1, 2)
    latent = torch.randn(10, BS, 1, 12, generator=g)
    fp8 = torch.randn(10, BS, 2, 8, generator=g).to(torch.float8_e4m3fn)
    caches = [heads_major.transpose(1, 2), latent, fp8]  # block-major storage, as the runner's
    before = [c.clone() for c in caches]
    conn = _connector(tmp_path, "ns", KVConnectorRole.WORKER, checksum=checksum, io_threads=2)
    conn.register_kv_caches(caches, swap_blocks, lambda: None, torch.device("cpu"))
    keys = ["a", "b", "c", "d", "e"]
    assert conn.save_kv({"saves": [[k, b] for k, b in zip(keys, (7, 2, 3, 5, 6))]}) is None
    conn.wait_for_save()  # written behind the step (kv_both: nothing waits for them)
    assert conn.files_written == 5
    inode = os.stat(conn.path("a", 0)).st_ino
    # A block whose file is there is not written again (asked on the write pool, not in the
    # step: the step's future still covers it).
    conn.save_kv({"saves": [["a", 7]], "wait": True}).result()
    assert (conn.files_written, conn.files_present) == (5, 1)
    assert os.stat(conn.path("a", 0)).st_ino == inode
    for c in caches:
        c.view(torch.uint8).zero_()
    assert conn.start_load_kv({"loads": [["r1", [["a", 9], ["b", 0]]], ["r2", [["c", 4]]]]}) == []
    assert conn.start_load_kv({"async_loads": [["r6", [["d", 1], ["e", 8]]]]}) == []
    assert conn.get_finished_loads(["r6"], timeout=30) == {"r6": True}
    assert conn.get_finished_loads([]) == {} and not conn._load_status  # forgotten once not asked
    for old, new in zip(before, caches):
        for src, dst in ((7, 9), (2, 0), (3, 4), (5, 1), (6, 8)):
            assert torch.equal(new[dst].view(torch.uint8), old[src].view(torch.uint8))
        assert not new[7].view(torch.uint8).any()
    assert conn._load_staging.chunk == 2 and conn._load_staging.made <= shared_storage_worker._LOAD_BUFFERS
    assert conn._save_staging.made <= 3  # 5 blocks: 3 chunks
    other = _connector(tmp_path, "ns", KVConnectorRole.WORKER)  # one tensor fewer: another layout
    other.register_kv_caches(caches[:2], swap_blocks, lambda: None, torch.device("cpu"))
    assert other.start_load_kv({"loads": [["r3", [["a", 1]]]]}) == ["r3"]
    with open(conn.path("d", 0), "r+b") as f:  # a byte of the latent cache's part flipped
        f.seek(HEADER_BYTES + conn.nbytes[0] + 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    loads = {"loads": [["r4", [["e", 1]]], ["r5", [["d", 8], ["b", 5]]]]}
    assert conn.start_load_kv(loads) == ([] if checksum == "none" else ["r5"])
    assert os.path.exists(conn.path("d", 0)) == (checksum == "none")  # a bad file is removed
    assert torch.equal(caches[1][1].view(torch.uint8), before[1][6].view(torch.uint8))
    conn.shutdown()


def test_two_engines_saving_the_same_blocks_at_once(tmp_path):
    """Two engines' worker halves sharing a directory save the same 24 blocks at the same
    time, over and over (the files removed in between, so both find them missing): each
    writes temporary files of its own and renames them, so every file is whole and loads
    equal to its block, no temporary file is left, and every block was written or found."""
    from tessellm.backends.reference.kv_transfer import swap_blocks

    g = torch.Generator().manual_seed(1)
    caches = [torch.randn(24, BS, 2, 8, generator=g), torch.randn(24, BS, 1, 12, generator=g)]
    conns = [_connector(tmp_path, "ns", KVConnectorRole.WORKER, io_threads=3) for _ in range(2)]
    for c in conns:
        c.register_kv_caches(caches, swap_blocks, lambda: None, torch.device("cpu"))
    saves = {"saves": [[f"k{i}", i] for i in range(24)]}
    for _ in range(5):
        for f in _files(tmp_path):
            os.unlink(f)
        start = threading.Barrier(2)

        def save(conn):
            start.wait()
            conn.save_kv(saves)
            conn.wait_for_save()

        threads = [threading.Thread(target=save, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [os.path.basename(f) for f in _files(tmp_path)] == sorted(f"k{i}.r0.kv" for i in range(24))
    assert sum(c.files_written + c.files_present for c in conns) == 2 * 5 * 24
    before = [c.clone() for c in caches]
    for c in caches:
        c.zero_()
    assert conns[0].start_load_kv({"loads": [["r", [[f"k{i}", 23 - i] for i in range(24)]]]}) == []
    for old, new in zip(before, caches):
        assert torch.equal(new, old.flip(0))
    for c in conns:
        c.shutdown()


def test_a_failed_loads_later_saves_are_dropped_too(tmp_path):
    """Under async scheduling the step after a failed load was scheduled before the scheduler
    knew: its saves of that request (computed over the failed load) are dropped too, the
    other requests' and the recompute's (offered without an owner) are written."""
    from tessellm.backends.reference.kv_transfer import swap_blocks

    caches = [torch.randn(8, BS, 2, 8)]
    conn = _connector(tmp_path, "ns", KVConnectorRole.WORKER)
    conn.register_kv_caches(caches, swap_blocks, lambda: None, torch.device("cpu"))
    conn.load_failed(["r"])
    conn.save_kv({"saves": [["a", 1], ["b", 2], ["c", 3]], "save_owners": ["r", "q", None]})
    conn.wait_for_save()
    assert [os.path.exists(conn.path(k, 0)) for k in "abc"] == [False, True, True]
    conn.shutdown()


def test_a_load_that_raises_gives_its_staging_buffer_back(tmp_path):
    """A background load that raises half-way (here its copy) is reported failed and gives its
    staging buffer back: more such loads than there are buffers, then a load that works
    (a lost buffer would leave the loader waiting for one forever)."""
    from tessellm.backends.reference.kv_transfer import swap_blocks

    caches = [torch.randn(8, BS, 2, 8)]
    conn = _connector(tmp_path, "ns", KVConnectorRole.WORKER)
    conn.register_kv_caches(caches, swap_blocks, lambda: None, torch.device("cpu"))
    conn.save_kv({"saves": [["a", 1]]})
    conn.wait_for_save()
    copy_in = conn._copy_in
    conn._copy_in = lambda parts, mapping: 1 / 0
    for i in range(3):
        conn.start_load_kv({"async_loads": [[f"bad{i}", [["a", 5]]]]})
        assert conn.get_finished_loads([f"bad{i}"], timeout=30) == {f"bad{i}": False}
    conn._copy_in = copy_in
    conn.start_load_kv({"async_loads": [["ok", [["a", 6]]]]})
    assert conn.get_finished_loads(["ok"], timeout=30) == {"ok": True}
    assert torch.equal(caches[0][6], caches[0][1])
    conn.shutdown()


def _four_blocks_saved_in_chunks_of_two(tmp_path, monkeypatch):
    """A worker connector whose staging chunks hold two blocks, blocks 1-4 of its 16 saved
    as keys a-d: (connector, caches, keys)."""
    from tessellm.backends.reference.kv_transfer import swap_blocks
    from tessellm.kv_transfer import shared_storage_worker

    monkeypatch.setattr(shared_storage_worker, "_CHUNK_BLOCKS", 2)
    caches = [torch.randn(16, BS, 2, 8)]
    conn = _connector(tmp_path, "ns", KVConnectorRole.WORKER)
    conn.register_kv_caches(caches, swap_blocks, lambda: None, torch.device("cpu"))
    keys = ["a", "b", "c", "d"]
    conn.save_kv({"saves": [[k, b] for k, b in zip(keys, (1, 2, 3, 4))]})
    conn.wait_for_save()
    return conn, caches, keys


def test_a_chunk_that_fails_before_its_reads_or_writer_gives_its_staging_buffer_back(
        tmp_path, monkeypatch):
    """A staging buffer taken for a chunk whose setup raises (its per-tensor parts here)
    before any read or writer has it goes back to the pool: background loads (more than there
    are buffers), a step's load whose second chunk (read ahead into the other buffer) fails,
    and a save, which raises, counts its blocks failed and leaves none pending. Then loads and
    saves work as before (a lost buffer would leave the next one waiting forever)."""
    from tessellm.kv_transfer import shared_storage_worker

    conn, caches, keys = _four_blocks_saved_in_chunks_of_two(tmp_path, monkeypatch)
    load, save = conn._load_staging, conn._save_staging
    parts, calls = conn._parts, []

    def fail_on(*which):
        def fake(flat, n):
            calls.append(n)
            if len(calls) in which:
                raise ZeroDivisionError("parts")
            return parts(flat, n)
        calls.clear()
        conn._parts = fake

    fail_on(1, 2, 3)
    for i in range(3):
        conn.start_load_kv({"async_loads": [[f"bad{i}", [["a", 5]]]]})
        assert conn.get_finished_loads([f"bad{i}"], timeout=10) == {f"bad{i}": False}
        assert len(load.free) == load.made
    fail_on(2)  # the first chunk reads; the second, read ahead, fails
    with pytest.raises(ZeroDivisionError):
        conn.start_load_kv({"loads": [["r", [[k, b] for k, b in zip(keys, (8, 9, 10, 11))]]]})
    assert len(load.free) == load.made == shared_storage_worker._LOAD_BUFFERS
    fail_on(1)
    with pytest.raises(ZeroDivisionError):
        conn.save_kv({"saves": [["e", 5], ["f", 6], ["g", 7]]})  # two chunks: none saved
    assert len(save.free) == save.made
    assert conn.save_totals()[:4] == [4, 3, 0, 0]
    assert not os.path.exists(conn.path("e", 0)) and not os.path.exists(conn.path("g", 0))
    conn._parts = parts
    assert conn.start_load_kv({"loads": [["r", [[k, b] for k, b in zip(keys, (8, 9, 10, 11))]]]}) == []
    conn.save_kv({"saves": [["e", 5]]})
    conn.wait_for_save()
    assert os.path.exists(conn.path("e", 0)) and conn.save_totals()[:4] == [5, 3, 0, 0]
    for src, dst in zip((1, 2, 3, 4), (8, 9, 10, 11)):
        assert torch.equal(caches[0][dst], caches[0][src])
    conn.shutdown()


def test_a_load_whose_reads_cannot_be_queued_gives_its_staging_buffer_back(tmp_path):
    """A load racing shutdown: the reader pool refuses its reads (here after the chunk's first
    of two is queued). The reads queued end, the load fails the normal way (background:
    reported failed; in the step: its request listed for a recompute) and its staging buffer
    is given back: more such loads than there are buffers, then loads that work (a lost
    buffer would leave the next load waiting for one forever)."""
    from tessellm.backends.reference.kv_transfer import swap_blocks

    caches = [torch.randn(24, BS, 2, 8)]
    conn = _connector(tmp_path, "ns", KVConnectorRole.WORKER, io_threads=2)
    conn.register_kv_caches(caches, swap_blocks, lambda: None, torch.device("cpu"))
    keys = ["a", "b", "c", "d"]
    conn.save_kv({"saves": [[k, b] for k, b in zip(keys, (1, 2, 3, 4))]})
    conn.wait_for_save()
    submit, queued = conn._readers.submit, []

    def refuse_after_one(fn, *args):
        if len(queued) % 2:
            queued.append(None)
            raise RuntimeError("tessellm-kv-read: submit after shutdown")
        queued.append(submit(fn, *args))
        return queued[-1]

    conn._readers.submit = refuse_after_one
    pairs = [[k, b] for k, b in zip(keys, (8, 9, 10, 11))]  # 4 blocks: two reads of 2
    for i in range(3):
        conn.start_load_kv({"async_loads": [[f"bad{i}", pairs]]})
        assert conn.get_finished_loads([f"bad{i}"], timeout=10) == {f"bad{i}": False}
    assert conn.start_load_kv({"loads": [["r", pairs]]}) == ["r"]
    assert len(queued) == 8 and all(f.done() for f in queued[::2])
    assert len(conn._load_staging.free) == conn._load_staging.made  # every buffer back
    conn._readers.submit = submit
    conn.start_load_kv({"async_loads": [["ok", pairs]]})
    assert conn.get_finished_loads(["ok"], timeout=10) == {"ok": True}
    assert conn.start_load_kv({"loads": [["r2", [[k, b + 11] for k, b in pairs]]]}) == []
    for src, dst in zip((1, 2, 3, 4), (8, 9, 10, 11)):
        assert torch.equal(caches[0][dst], caches[0][src])
        assert torch.equal(caches[0][dst + 11], caches[0][src])
    conn.shutdown()


def test_a_step_load_does_not_wait_for_a_buffer_another_load_holds(tmp_path, monkeypatch):
    """A step's load of two staging chunks reads its second chunk ahead into the other buffer
    only when one is free or busy with copies: when another load holds it, the step's load
    reads its chunks one after the other at once (no wait for the buffer) and still loads
    every block."""
    from tessellm.kv_transfer import shared_storage_worker

    conn, caches, keys = _four_blocks_saved_in_chunks_of_two(tmp_path, monkeypatch)
    staging = conn._load_staging
    held = staging.acquire()  # another (background) load's buffer
    waits, wait = [], staging.cond.wait
    staging.cond.wait = lambda timeout=None: waits.append(timeout) or wait(timeout)
    assert conn.start_load_kv({"loads": [["r", [[k, b] for k, b in zip(keys, (8, 9, 10, 11))]]]}) == []
    assert waits == [] and staging.made == shared_storage_worker._LOAD_BUFFERS
    for src, dst in zip((1, 2, 3, 4), (8, 9, 10, 11)):
        assert torch.equal(caches[0][dst], caches[0][src])
    staging.release(held)
    conn.shutdown()


def test_saves_copies_guard_only_the_blocks_a_step_writes(tmp_path):
    """Saves copied on the connector's own stream (a GPU's) are still reading their blocks:
    a step writing one of them (freed, given out again) makes the device wait for that chunk's
    copies, and only for those; copies done are forgotten. The events stand in for a device's
    (the cpu has no streams: its copies are done when save_kv returns)."""
    from collections import deque

    class Event:
        def __init__(self, done=False):
            self.done, self.waited = done, 0

        def query(self):
            return self.done

        def wait(self):
            self.waited += 1

    conn = _connector(tmp_path, "ns", KVConnectorRole.WORKER)
    old, a, b = Event(done=True), Event(), Event()
    conn._reads = deque([(old, frozenset({1})), (a, frozenset({2, 3})), (b, frozenset({7}))])
    assert conn.pending_block_reads() and [e for e, _ in conn._reads] == [a, b]
    conn.before_writing({1, 3, 9})
    assert (a.waited, b.waited) == (1, 0)
    a.done = b.done = True
    assert not conn.pending_block_reads()
    assert KVConnectorBase.pending_block_reads(conn) is False  # the default: nothing to guard


def test_producer_outputs_wait_only_in_steps_that_sample(tmp_path):
    """With wait_for_save, a producer's step carries "wait" (its outputs wait for the saves in
    flight) only when it samples a token for a request with saves: its prompt's last chunk, not
    the chunks before; by default (the first token never waits for files) and on a kv_both
    engine (a disk tier) no step waits."""
    tokens = list(range(3, 23))  # 5 blocks
    req = SimpleNamespace(request_id="r", all_token_ids=tokens, num_tokens=20, kv_load_failed=False,
                          lora_request=None, block_key=lambda a, b, lora: None)
    for role, wait, want in (("kv_producer", True, [False, True]), ("kv_producer", None, [False, False]),
                             ("kv_both", None, [False, False])):
        config = parse_kv_transfer_config(_kv(tmp_path, role))
        if wait is not None:
            config.kv_connector_extra_config["wait_for_save"] = wait
        conn = SharedStorageConnector(config, KVConnectorRole.SCHEDULER, KVConnectorContext(BS, "ns"))
        waits, saved = [], []
        for start, num in ((0, 12), (12, 8)):  # a chunked prefill: 12 tokens, then 8
            seen = [SimpleNamespace(request_id="r", num_computed_tokens=start)]
            out = SimpleNamespace(new_requests=seen if start == 0 else [],
                                  cached_requests=[] if start == 0 else seen,
                                  num_scheduled_tokens={"r": num})
            meta = conn.build_connector_meta(out, {"r": req}, lambda rid: list(range(5)))
            waits.append(meta["wait"])
            saved.append([b for _, b in meta["saves"]])
        assert waits == want and saved == [[0, 1, 2], [3, 4]]
    # Without wait_for_save, a request whose kv_transfer_params say do_remote_decode (a vLLM
    # proxy's prefill request) waits on its own: its last chunk's step.
    conn = SharedStorageConnector(parse_kv_transfer_config(_kv(tmp_path, "kv_producer")),
                                  KVConnectorRole.SCHEDULER, KVConnectorContext(BS, "ns"))
    for params, want in (({"do_remote_decode": True, "remote_host": None}, [False, True]),
                         ({"do_remote_decode": False}, [False, False])):
        remote = SimpleNamespace(**{**vars(req), "request_id": f"p{want[1]}"},
                                 sampling_params=SamplingParams(kv_transfer_params=params))
        waits = []
        for start, num in ((0, 12), (12, 8)):
            seen = [SimpleNamespace(request_id=remote.request_id, num_computed_tokens=start)]
            out = SimpleNamespace(new_requests=seen if start == 0 else [],
                                  cached_requests=[] if start == 0 else seen,
                                  num_scheduled_tokens={remote.request_id: num})
            meta = conn.build_connector_meta(out, {remote.request_id: remote}, lambda rid: list(range(5)))
            waits.append(meta["wait"])
        assert waits == want


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_mla_latent_cache_through_shared_storage(kv_cache_dtype, tmp_path):
    """DeepSeek-V3's latent cache, float32 and fp8: the consumer loads the producer's blocks
    and gives the tokens of a plain run (and HF's in float32)."""
    from tests.models.test_deepseek import deepseek_config, save_deepseek
    from tests.models.variant_parity import hf_reference

    path = save_deepseek(deepseek_config(True, q_lora_rank=24), str(tmp_path / "ds"))
    prompts = [[t % 128 for t in x] for x in _prompts(1)]
    engine = dict(kv_cache_dtype=kv_cache_dtype)
    plain, _ = _run(path, prompts, 4, **engine)
    _run(path, prompts, 4, kv_transfer_config=_kv(tmp_path / "kv", "kv_producer"), **engine)
    rows, stats = _run(path, prompts, 4, kv_transfer_config=_kv(tmp_path / "kv", "kv_consumer"),
                       **engine)
    assert [t for t, _, _ in rows] == [t for t, _, _ in plain]
    if kv_cache_dtype == "auto":
        assert [t for t, _, _ in rows] == hf_reference(path, prompts, 4)[0]
    assert rows[0][1] == 40 and stats.kv_connector["blocks_loaded"] == 10


@pytest.mark.parametrize("engine", [
    pytest.param(dict(tensor_parallel_size=2), marks=pytest.mark.slow, id="tp2"),
    pytest.param(dict(async_scheduling=True), id="async"),
])
def test_parallel_ranks_and_async_scheduling(engine, tiny_model_dir, tmp_path):
    """Two tensor-parallel ranks (gloo) each save and load their own shard (file names carry
    the rank); or async scheduling. HF's tokens; the consumer loads 40 tokens."""
    model = tiny_model_dir("llama")
    prompts = _prompts(1)
    _run(model, prompts, kv_transfer_config=_kv(tmp_path, "kv_producer"), **engine)
    files = _files(tmp_path)
    ranks = engine.get("tensor_parallel_size", 1)
    assert len(files) == 11 * ranks and {f.rsplit(".r", 1)[1] for f in files} == {
        f"{r}.kv" for r in range(ranks)}
    rows, _ = _run(model, prompts, kv_transfer_config=_kv(tmp_path, "kv_consumer"), **engine)
    assert rows == [(hf_greedy(model, prompts, 6)[0], 40, 7)]


@pytest.mark.slow  # ~30 s on 2 cores (two worker processes, twice)
def test_a_load_failing_on_one_tensor_parallel_rank_fails_on_all(tiny_model_dir, tmp_path):
    """Rank 1's file of one block is corrupt, rank 0's is fine: the ranks agree the background
    load failed (one all-reduce once both finished it), the request is recomputed on both, and
    its tokens are HF's."""
    model = tiny_model_dir("llama")
    prompts = _prompts(1)
    _run(model, prompts, kv_transfer_config=_kv(tmp_path, "kv_producer"), tensor_parallel_size=2)
    (ns,) = os.listdir(tmp_path)
    keys = _connector(tmp_path, ns).block_keys(SimpleNamespace(
        request_id="p", all_token_ids=prompts[0], lora_request=None, block_key=lambda a, b, lora: None))
    _flip_byte(_connector(tmp_path, ns).path(keys[3], 1), 3, 0x55)  # block 3, rank 1
    rows, stats = _run(model, prompts, kv_transfer_config=_kv(tmp_path, "kv_consumer"),
                       tensor_parallel_size=2)
    assert rows == [(hf_greedy(model, prompts, 6)[0], 0, 42 + 5)]  # failed in the background
    assert stats.kv_connector["load_failures"] == 1


def test_engines_of_another_layout_or_weights_do_not_share(tiny_model_dir, tmp_path):
    """Another block size (or dtype, parallel layout) is another namespace: a miss; so are
    other weights under an equal config (here: the same files in another directory)."""
    import shutil

    model = tiny_model_dir("llama")
    other = shutil.copytree(model, tmp_path / "other-weights")
    prompts = _prompts(1)
    _run(model, prompts, kv_transfer_config=_kv(tmp_path / "kv", "kv_producer"))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    for path, block_size in ((model, 8), (other, BS)):
        with LLM(str(path), device="cpu", dtype="float32", block_size=block_size, num_kv_blocks=32,
                 max_model_len=128, kv_transfer_config=_kv(tmp_path / "kv", "kv_consumer")) as llm:
            out = llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)[0]
        assert out.num_cached_tokens == 0
    assert len(os.listdir(tmp_path / "kv")) == 3


def test_lora_adapters_are_keyed_by_their_files_not_their_ids(tiny_model_dir, tmp_path):
    """A lora_int_id means something in one engine only: another adapter under the producer's
    id is a miss (the consumer's own adapter's tokens, as peft's); the producer's adapter (its
    files copied elsewhere) under another id and name is a hit."""
    import shutil

    from tessellm.lora import LoRARequest
    from tests.lora.adapters import make_adapters, peft_greedy

    model = tiny_model_dir("llama-sharp")
    paths = make_adapters(model, str(tmp_path / "adapters"),
                          specs={"a": (4, ["q_proj", "v_proj"], dict(lora_alpha=8)),
                                 "b": (4, ["k_proj", "v_proj"], dict(lora_alpha=8))})
    copy = shutil.copytree(paths["a"], tmp_path / "elsewhere" / "a")
    prompt = _prompts(1)[0]
    want = {n: peft_greedy(model, p, [prompt], 4)[0] for n, p in paths.items()}
    assert want["a"] != want["b"]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def run(role: str, lora):
        with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=32,
                 max_model_len=128, enable_lora=True, max_lora_rank=8,
                 kv_transfer_config=_kv(tmp_path / "kv", role)) as llm:
            out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False,
                               lora_request=lora)[0]
        return list(out.outputs[0].token_ids), out.num_cached_tokens

    assert run("kv_producer", LoRARequest("a", 1, paths["a"])) == (want["a"], 0)
    assert run("kv_consumer", LoRARequest("b", 1, paths["b"])) == (want["b"], 0)
    assert run("kv_consumer", LoRARequest("a-copy", 7, str(copy))) == (want["a"], 40)


class RecordingConnector(KVConnectorBase):
    """A third-party connector: loads nothing, records what the engine asked of it."""

    calls: list = []

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        RecordingConnector.calls.append(("match", request.num_tokens, num_computed_tokens))
        return 0

    def request_finished(self, request):
        RecordingConnector.calls.append(("finished", request.request_id))


def test_third_party_connector_registers_by_name(tiny_model_dir):
    register_kv_connector("Recording", f"{__name__}:RecordingConnector")
    RecordingConnector.calls.clear()
    with LLM(tiny_model_dir("llama"), device="cpu", block_size=BS, num_kv_blocks=16,
             max_model_len=64, kv_transfer_config={"kv_connector": "Recording"}) as llm:
        llm.generate({"prompt_token_ids": [5, 6, 7, 8, 9]},
                     SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert [c[0] for c in RecordingConnector.calls] == ["match", "finished"]
    assert RecordingConnector.calls[0][1:] == (5, 0)


def test_connector_from_an_installed_packages_entry_point(tmp_path, monkeypatch):
    """A package declaring ``[tessellm.kv_connectors] FromEP = module:Class`` (a distribution
    on sys.path, as pip installs one) is found by name; a built-in name is never replaced."""
    import importlib

    from tessellm.kv_transfer.registry import KVConnectorRegistry

    info = tmp_path / "kvconn_fake-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvconn_fake\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tessellm.kv_connectors]\n"
                                           "FromEP = kvconn_fake_mod:Conn\n"
                                           "SharedStorageConnector = kvconn_fake_mod:Conn\n")
    (tmp_path / "kvconn_fake_mod.py").write_text(
        "from tessellm.kv_transfer import KVConnectorBase\n\nclass Conn(KVConnectorBase):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    registry = KVConnectorRegistry()
    assert "FromEP" in registry.names()
    assert registry.resolve(KVTransferConfig("FromEP")).__module__ == "kvconn_fake_mod"
    assert registry.resolve(KVTransferConfig("SharedStorageConnector")) is SharedStorageConnector


@pytest.mark.parametrize("value, match", [
    ("{not json", "kv_transfer_config is not valid JSON"),
    ([1], "must be a JSON object"),
    ({"kv_role": "kv_both"}, 'needs "kv_connector"'),
    ({"kv_connector": "SharedStorageConnector", "kv_role": "prefill"}, "kv_role must be one of"),
    ({"kv_connector": "SharedStorageConnector", "kv_ip": "1.2.3.4"}, r"unknown key\(s\) \['kv_ip'\]"),
    ({"kv_connector": "X", "kv_connector_extra_config": [1]}, "must be a JSON object"),
])
def test_bad_configs_are_one_clear_error(value, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(kv_transfer_config=value).validate()


def test_bad_connector_settings_are_one_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="enable_prefix_caching is off"):
        EngineArgs(kv_transfer_config=_kv(tmp_path, "kv_both"), enable_prefix_caching=False).validate()
    with pytest.raises(ValueError, match="pipeline_parallel_size > 1"):
        EngineArgs(kv_transfer_config=_kv(tmp_path, "kv_both"), pipeline_parallel_size=2).validate()
    ctx = KVConnectorContext(BS, "ns")
    with pytest.raises(ValueError, match="not registered; known connectors: .*SharedStorageConnector"):
        make_connector(KVTransferConfig("Nope"), KVConnectorRole.SCHEDULER, ctx)
    with pytest.raises(ValueError, match="needs kv_connector_extra_config.shared_storage_path"):
        make_connector(KVTransferConfig("SharedStorageConnector"), KVConnectorRole.SCHEDULER, ctx)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['path'\]"):
        make_connector(KVTransferConfig("SharedStorageConnector", kv_connector_extra_config={"path": "x"}),
                       KVConnectorRole.SCHEDULER, ctx)
    for extra, match in (({"checksum": "md5"}, "checksum must be one of none, sum64, crc32"),
                         ({"io_threads": 0}, "io_threads a positive integer"),
                         ({"wait_for_save": "yes"}, "wait_for_save and load_async are true or false"),
                         ({"load_async": 1}, "wait_for_save and load_async are true or false")):
        config = parse_kv_transfer_config(_kv(tmp_path, "kv_both"))
        config.kv_connector_extra_config.update(extra)
        with pytest.raises(ValueError, match=match):
            make_connector(config, KVConnectorRole.SCHEDULER, ctx)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot use shared_storage_path"):
        make_connector(parse_kv_transfer_config(_kv(blocker, "kv_both")), KVConnectorRole.SCHEDULER, ctx)
    with pytest.raises(ValueError, match="kv_connector_module_path 'no_such_mod' cannot be imported"):
        make_connector(KVTransferConfig("X", kv_connector_module_path="no_such_mod"),
                       KVConnectorRole.SCHEDULER, ctx)
    with pytest.raises(ValueError, match="prefix caching is off for this model"):
        LLM(tiny_model_dir("llama"), device="cpu", num_kv_blocks=16, runner="pooling",
            pooler_config={"pooling_type": "MEAN"}, kv_transfer_config=_kv(tmp_path, "kv_both"))
    with LLM(tiny_model_dir("llama"), device="cpu", num_kv_blocks=16,
             kv_transfer_config=_kv(tmp_path, "kv_both")) as llm:  # new weights, old shared KV
        with pytest.raises(ValueError, match="load_weights would change the weights while a KV connector"):
            llm.load_weights(path=tiny_model_dir("llama"))
    assert json.loads(json.dumps(parse_kv_transfer_config(_kv(tmp_path, "kv_both")).to_dict()))


class SilentBackgroundConnector(KVConnectorBase):
    """A third-party connector that asks for a background load but never reports one."""

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 2 * BS, True


def test_a_background_load_nobody_reports_is_one_clear_error(tiny_model_dir):
    """A connector returning (n, True) without a get_finished_loads of its own is told so at
    its first such load, instead of its requests waiting forever."""
    register_kv_connector("SilentBackground", f"{__name__}:SilentBackgroundConnector")
    with LLM(tiny_model_dir("llama"), device="cpu", block_size=BS, num_kv_blocks=16,
             max_model_len=64, kv_transfer_config={"kv_connector": "SilentBackground"}) as llm:
        with pytest.raises(ValueError, match="SilentBackgroundConnector loads in the background .* "
                                             "implement get_finished_loads"):
            llm.generate({"prompt_token_ids": list(range(5, 5 + 3 * BS))},
                         SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)


@pytest.mark.parametrize("load_async", [True, False], ids=["background", "in-step"])
def test_lookups_stat_files_off_the_step(load_async, tiny_model_dir, tmp_path, monkeypatch):
    """The consumer's lookups ask the file system only on the lookup thread, never on the
    engine's (the scheduler's step): every ``stat`` of a block file is made there, the request
    waits for its first lookup in its place, and it loads its 40 tokens and gives HF's tokens."""
    import tessellm.kv_transfer.shared_storage as ss

    model = tiny_model_dir("llama")
    prompts = _prompts(2)
    want = hf_greedy(model, prompts, 6)
    _run(model, prompts, kv_transfer_config=_kv(tmp_path, "kv_producer"))
    threads = []
    real = ss.loadable
    monkeypatch.setattr(ss, "loadable", lambda *a: threads.append(threading.current_thread().name)
                        or real(*a))
    consumer = _kv(tmp_path, "kv_consumer")
    consumer["kv_connector_extra_config"]["load_async"] = load_async
    rows, stats = _run(model, prompts, kv_transfer_config=consumer)
    assert rows == [(w, 40, 2 + 5) for w in want]
    assert len(threads) == 2 * 10 and all(t.startswith("tessellm-kv-lookup") for t in threads)
    assert (stats.kv_connector["queries"], stats.kv_connector["hits"]) == (2 * 42, 2 * 40)


def test_a_lookup_answers_later_refreshes_a_stale_miss_and_forgets_failed_keys(tmp_path, monkeypatch):
    """The scheduler half on real files: the first ask is None (looked up off the step), then
    the run of files found; files written after that are found once the miss is stale (the
    answer meanwhile is what is known, never a wait); a failed load forgets the request's keys
    (they are looked up again); a finished request's lookup state goes."""
    import tessellm.kv_transfer.shared_storage as ss
    from tessellm.kv_transfer import shared_storage_format as fmt

    conn = _connector(tmp_path, "ns", lookup_wait_ms=0)  # a step never waits for a lookup
    req = SimpleNamespace(request_id="r", all_token_ids=list(range(3, 24)), num_tokens=21,
                          lora_request=None, block_key=lambda a, b, lora: None)
    keys = conn.block_keys(req)

    def write(i):
        fmt.write_block(conn.path(keys[i], 0), keys[i], 0, "none", bytes(16), 16,
                        [memoryview(bytes(16))], None)

    write(0), write(1)
    assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
    conn.wait_for_lookups(5)
    assert conn.get_num_new_matched_tokens(req, 0) == (2 * BS, True)
    assert conn.get_num_new_matched_tokens(req, BS) == (BS, True)  # after a device hit of one block
    for i in (2, 3, 4):
        write(i)
    assert conn.get_num_new_matched_tokens(req, 0) == (2 * BS, True)  # the miss is fresh
    monkeypatch.setattr(ss, "_LOOKUP_TTL_S", 0.0)
    assert conn.get_num_new_matched_tokens(req, 0) == (2 * BS, True)  # stale: refreshed behind
    conn.wait_for_lookups(5)
    assert conn.get_num_new_matched_tokens(req, 0) == (5 * BS, True)  # never the last token's block
    conn.request_failed_load(req)
    assert not any(k in conn._checked for k in keys)
    assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
    conn.request_finished(req)
    assert not conn._lookups
    # By default a step waits for first lookups a little (2 ms in all): here up to 5 s, so the
    # first ask is answered (the lookup still on the lookup thread).
    waits = _connector(tmp_path, "ns", lookup_wait_ms=5000)
    assert waits.get_num_new_matched_tokens(req, 0) == (5 * BS, True)
    with pytest.raises(ValueError, match="lookup_wait_ms is how long a step may wait"):
        _connector(tmp_path, "ns", lookup_wait_ms=-1)


def _threads(prefix: str) -> list:
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


def test_a_connector_used_after_its_shutdown_makes_no_pool_again(tmp_path):
    """Once shut down (a step racing the engine's shutdown) the connector's pools stay ended:
    a background load is reported failed and an in-step load listed failed (both recomputed),
    a save is skipped (counted, no file written), a lookup answers nothing; no thread of a
    new loader, saver or lookup pool is started (one would outlive the connector, and a save
    went on writing files past the shutdown that waited for the saves)."""
    from tessellm.backends.reference.kv_transfer import swap_blocks

    caches = [torch.randn(8, BS, 2, 8)]
    conn = _connector(tmp_path, "ns", KVConnectorRole.WORKER)
    conn.register_kv_caches(caches, swap_blocks, lambda: None, torch.device("cpu"))
    conn.save_kv({"saves": [["a", 1]]})
    conn.wait_for_save()
    conn.start_load_kv({"async_loads": [["r0", [["a", 5]]]]})
    assert conn.get_finished_loads(["r0"], timeout=10) == {"r0": True}
    conn.shutdown()
    before = {p: len(_threads(p)) for p in ("tessellm-kv-load", "tessellm-kv-save")}
    conn.start_load_kv({"async_loads": [["r1", [["a", 6]]]]})
    assert conn.get_finished_loads(["r1"], timeout=10) == {"r1": False}
    assert conn.start_load_kv({"loads": [["r2", [["a", 7]]]]}) == ["r2"]
    conn.save_kv({"saves": [["b", 2]]})
    assert conn.save_totals()[:4] == [1, 0, 0, 1]
    assert not os.path.exists(conn.path("b", 0))
    assert {p: len(_threads(p)) for p in before} == before
    assert conn._loader is None and conn._writer is None

    sched = _connector(tmp_path, "ns", lookup_wait_ms=5000)
    req = SimpleNamespace(request_id="q", all_token_ids=list(range(3, 24)), num_tokens=21,
                          lora_request=None, block_key=lambda a, b, lora: None)
    sched.shutdown()
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert sched._lookup_threads is None


@pytest.mark.parametrize("op", ["save", "load"])
def test_a_shutdown_racing_a_steps_save_or_load_waits_for_it(tmp_path, op):
    """A step's save or load that began before the shutdown (it passed the open check) and is
    still in its copies when the shutdown starts: the shutdown waits for it to leave, so the
    save is written before the shutdown returns (not by a writer pool made again after it)
    and the load's copies are done before; no pool thread outlives the shutdown. A flag
    checked at the call's start left this window open (the gate in shared_storage_worker.py)."""
    from tessellm.backends.reference.kv_transfer import swap_blocks

    armed, entered, go = threading.Event(), threading.Event(), threading.Event()

    def slow_swap(src, dst, mapping):  # the step's copies, held at the test's word
        if armed.is_set():
            armed.clear()
            entered.set()
            assert go.wait(10)
        swap_blocks(src, dst, mapping)

    caches = [torch.randn(8, BS, 2, 8)]
    conn = _connector(tmp_path, "ns", KVConnectorRole.WORKER)
    conn.register_kv_caches(caches, slow_swap, lambda: None, torch.device("cpu"))
    conn.save_kv({"saves": [["a", 1]]})
    conn.wait_for_save()
    prefixes = ("tessellm-kv-load", "tessellm-kv-save", "tessellm-kv-write", "tessellm-kv-read")
    before = {t for p in prefixes for t in _threads(p)}  # this connector's pools' (and leftovers)
    order, seen = [], {}

    def step():
        if op == "save":
            conn.save_kv({"saves": [["b", 2]]})
        else:
            seen["failed"] = conn.start_load_kv({"loads": [["r", [["a", 5]]]]})
        order.append("step")

    def shutdown():
        conn.shutdown()
        seen["written"] = os.path.exists(conn.path("b", 0))
        order.append("shutdown")

    armed.set()
    stepping = threading.Thread(target=step)
    stepping.start()
    assert entered.wait(10)  # the step is in its copies, past the open check
    stopping = threading.Thread(target=shutdown)
    stopping.start()
    stopping.join(0.5)
    assert stopping.is_alive()  # waits for the step ...
    go.set()
    stepping.join(10)
    stopping.join(10)
    assert order == ["step", "shutdown"]  # ... and returns after it
    if op == "save":
        assert seen["written"] and conn.save_totals()[:4] == [2, 0, 0, 0]
    else:
        assert seen["failed"] == [] and torch.equal(caches[0][5], caches[0][1])
    assert conn._loader is None and conn._writer is None and conn._readers is None
    assert {t for p in prefixes for t in _threads(p)} <= before  # no pool made again ...
    conn.save_kv({"saves": [["c", 3]]})  # ... nor after it: refused
    assert conn.start_load_kv({"loads": [["q", [["a", 6]]]]}) == ["q"]
    assert {t for p in prefixes for t in _threads(p)} <= before and not os.path.exists(conn.path("c", 0))


def test_a_hung_lookup_is_waited_for_once_not_every_step(tmp_path, monkeypatch):
    """A lookup that does not come back (a hung mount, a silent peer) holds the step that first
    asks about its request ``lookup_wait_ms``, and no later step: the steps after it answer
    "not yet" at once; once the lookup is back the request is answered."""
    conn = _connector(tmp_path, "ns", lookup_wait_ms=300)
    req = SimpleNamespace(request_id="r", all_token_ids=list(range(3, 24)), num_tokens=21,
                          lora_request=None, block_key=lambda a, b, lora: None)
    release = threading.Event()
    real = conn._look
    monkeypatch.setattr(conn, "_look", lambda keys, start: release.wait(30) and real(keys, start))
    try:
        t0 = time.monotonic()
        assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
        assert time.monotonic() - t0 >= 0.3
        for _ in range(3):  # later steps (build_connector_meta gives each its wait afresh)
            conn.build_connector_meta(SimpleNamespace(new_requests=[], cached_requests=[],
                                                      num_scheduled_tokens={}), {}, lambda rid: [])
            t0 = time.monotonic()
            assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
            assert time.monotonic() - t0 < 0.15
    finally:
        release.set()
    conn.wait_for_lookups(5)
    assert conn.get_num_new_matched_tokens(req, 0) == (0, True)
    conn.shutdown()


def _release_fifo(path) -> None:
    """A FIFO's blocked reader gets EOF (a writer opens it and closes)."""
    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_a_dead_store_is_marked_down_skipped_and_probed_back(tmp_path, caplog):
    """A lookup whose read never returns (block 1's file is a FIFO nobody writes: opening it to
    read its header blocks, on the real lookup path) is given up on after
    ``lookup_timeout_ms``: the request computes its prompt, counted in ``lookup_timeouts``, and
    the store is marked down. Another request's lookup answered before that loads. Every later
    request is answered at once without a lookup (no wait for the timeout, none submitted,
    counted in ``lookups_skipped``); past ``store_down_ms`` a probe runs off the asking thread
    and keeps the store down while the read still hangs; once the FIFO gives its reader EOF,
    the next probe brings the store back and a request finds its stored block again. Logged
    once."""
    import logging

    from tessellm.kv_transfer import shared_storage_format as fmt

    caplog.set_level(logging.INFO, logger="tessellm.kv_transfer.threads")
    conn = _connector(tmp_path, "ns", lookup_wait_ms=0, lookup_timeout_ms=300, store_down_ms=300)
    req = {rid: SimpleNamespace(request_id=rid, all_token_ids=list(range(s, s + 21)),
                                num_tokens=21, lora_request=None, block_key=lambda a, b, lora: None)
           for rid, s in (("hung", 3), ("other", 100), ("b", 150), ("c", 200), ("d", 250))}
    for rid in ("other", "d"):  # each has its first block in the store
        key = conn.block_keys(req[rid])[0]
        fmt.write_block(conn.path(key, 0), key, 0, "none", bytes(16), 16, [memoryview(bytes(16))],
                        None)
    fifo = conn.path(conn.block_keys(req["hung"])[0], 0)
    os.mkfifo(fifo)
    ask = conn.get_num_new_matched_tokens
    try:
        t0 = time.monotonic()
        assert ask(req["hung"], 0) == (None, False)
        assert ask(req["other"], 0) == (None, False)
        conn.wait_for_lookups(5)  # the other's lookup: back at once
        assert ask(req["other"], 0) == (BS, True)
        while ask(req["hung"], 0) == (None, False):
            assert time.monotonic() - t0 < 5, "the hung lookup never timed out"
            conn.wait_for_lookups(0.02)
        assert time.monotonic() - t0 >= 0.3
        assert conn.stats.lookup_timeouts == 1 and conn.stats.store_down == 1
        assert not conn._lookups["hung"].future.done()  # the read still hangs: not asked again
        for rid in ("b", "c", "d"):  # the store is down: answered at once, nothing looked up
            t1 = time.monotonic()
            assert ask(req[rid], 0) == (0, False)
            assert time.monotonic() - t1 < 0.05 and rid not in conn._lookups
        assert conn.stats.lookups_skipped == 3
        time.sleep(0.35)  # past the back-off: the next ask starts a probe, not on this thread
        assert ask(req["d"], 0) == (0, False) and conn.health._probing
        while conn.health._probing:
            time.sleep(0.01)
        assert conn.health.is_down  # a read still hangs: still down
    finally:
        _release_fifo(fifo)  # the reader gets EOF: a miss; the store answers again
    deadline = time.monotonic() + 5
    got = ask(req["d"], 0)
    while got != (BS, True):  # skipped, then a probe brings it back, then d's lookup
        assert time.monotonic() < deadline, f"the store never came back ({got})"
        conn.wait_for_lookups(0.02)
        got = ask(req["d"], 0)
    d = conn.stats.as_dict()
    assert (d["lookup_timeouts"], d["store_down"]) == (1, 1) and d["lookups_skipped"] >= 4
    assert caplog.text.count("counts as down") == 1 and "answers again" in caplog.text
    conn.shutdown()
    with pytest.raises(ValueError, match="lookup_timeout_ms is how long a request waits"):
        _connector(tmp_path, "ns", lookup_timeout_ms=0)
    with pytest.raises(ValueError, match="store_down_ms is how long a store"):
        _connector(tmp_path, "ns", store_down_ms=0)


def test_a_store_whose_writes_hang_skips_saves_and_shuts_down_in_bound(tmp_path, monkeypatch,
                                                                       caplog):
    """The worker half over a disk whose writes hang (each write reads a FIFO first, which
    blocks until the test writes it): a step's outputs waiting for their saves go after
    ``lookup_timeout_ms``, the store marked down and those saves counted skipped; the next
    step's saves are skipped at once (no copy, no writer); once the disk answers, a probe (off
    the step) brings the store back and saves are written again. With the disk hung again,
    ``shutdown`` returns within its bound, logs what it left, and leaves only daemon threads."""
    from tessellm.backends.reference.kv_transfer import swap_blocks
    from tessellm.kv_transfer import shared_storage_format as fmt

    conn = _connector(tmp_path, "ns", KVConnectorRole.WORKER, lookup_timeout_ms=300,
                      store_down_ms=300, io_threads=1)
    caches = [torch.randn(8, BS, 2, 4)]
    conn.register_kv_caches(caches, swap_blocks, lambda: None, torch.device("cpu"))
    disk = str(tmp_path / "disk")
    os.mkfifo(disk)
    hang, real = [True], fmt.write_block

    def write_block(path, *args):
        if hang[0]:
            with open(disk, "rb") as f:  # blocks until the test opens the FIFO to write
                f.read()
        return real(path, *args)

    monkeypatch.setattr(fmt, "write_block", write_block)
    keys = [f"{i:064x}" for i in range(8)]
    try:
        t0 = time.monotonic()
        conn.save_kv({"saves": [[keys[0], 0], [keys[1], 1]], "wait": True}).result()
        assert 0.3 <= time.monotonic() - t0 < 3  # not held by the hung write past its bound
        assert conn.health.is_down and conn.save_totals() == [0, 0, 0, 2, 1]
        t0 = time.monotonic()
        assert conn.save_kv({"saves": [[keys[2], 2]], "wait": True}) is None
        assert time.monotonic() - t0 < 0.05 and conn.save_totals() == [0, 0, 0, 3, 1]
        hang[0] = False
        _release_fifo(disk)  # the disk answers: the hung write returns
        deadline = time.monotonic() + 5
        while conn.health.down():  # the probe (off this thread) brings it back
            assert time.monotonic() < deadline, "the store never came back"
            time.sleep(0.02)
        conn.save_kv({"saves": [[keys[3], 3]], "wait": True}).result()
        assert conn.save_totals() == [1, 0, 0, 3, 1]
        assert os.path.exists(conn.path(keys[3], 0)) and not os.path.exists(conn.path(keys[1], 0))
        # the disk hangs again: shutdown returns within its bound, leaving daemons behind
        hang[0] = True
        assert conn.save_kv({"saves": [[keys[4], 4]]}) is None
        time.sleep(0.05)
        t0 = time.monotonic()
        conn.shutdown()
        assert time.monotonic() - t0 < 3
        assert "1 block(s) not saved" in caplog.text and "leaving" in caplog.text
        left = [t for t in threading.enumerate() if t.name.startswith("tessellm-kv")]
        assert left and all(t.daemon for t in left)
    finally:
        hang[0] = False
        try:
            _release_fifo(disk)
        except OSError:
            pass  # nobody reads it


def test_a_hung_lookup_does_not_hold_other_requests(tiny_model_dir, tmp_path, monkeypatch):
    """A consumer engine whose store hangs on one request's files (every check of p's first
    block never returns): q, in the store, loads its 40 tokens and runs to the end meanwhile;
    p is admitted once its lookup times out and computes its prompt, and the store is marked
    down: r, added then, is not looked up (no second timeout) and computes its prompt although
    its blocks are in the store; all give HF's tokens, the stats count one timeout, one fall
    and one skipped lookup."""
    import tessellm.kv_transfer.shared_storage as ss

    model = tiny_model_dir("llama")
    p, q, r = _prompts(3)
    want = dict(zip("pqr", hf_greedy(model, [p, q, r], 6)))
    _run(model, [q, r], kv_transfer_config=_kv(tmp_path, "kv_producer"))
    (ns,) = os.listdir(tmp_path)
    hung_key = _connector(tmp_path, ns).block_keys(SimpleNamespace(
        request_id="p", all_token_ids=p, lora_request=None, block_key=lambda a, b, lora: None))[0]
    release = threading.Event()
    real = ss.loadable
    monkeypatch.setattr(ss, "loadable", lambda path, size: (hung_key not in path
                                                             or release.wait(30) and False)
                        and real(path, size))
    kv = _kv(tmp_path, "kv_consumer")
    kv["kv_connector_extra_config"]["lookup_timeout_ms"] = 1500
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs, q_done_first = {}, None
    try:
        with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=64,
                 max_model_len=128, kv_transfer_config=kv) as llm:
            engine, sched = llm.engine, llm.engine.core.scheduler
            engine.add_request("p", {"prompt_token_ids": p}, params)
            engine.add_request("q", {"prompt_token_ids": q}, params)
            t0 = time.monotonic()
            while engine.has_unfinished_requests() and time.monotonic() - t0 < 30:
                outs.update((o.request_id, o) for o in engine.step() if o.finished)
                if q_done_first is None and "q" in outs:
                    q_done_first = "p" not in outs and sched.connector.stats.lookup_timeouts == 0
            assert sched.connector.health.is_down  # p's lookup timed out
            engine.add_request("r", {"prompt_token_ids": r}, params)
            while engine.has_unfinished_requests() and time.monotonic() - t0 < 30:
                outs.update((o.request_id, o) for o in engine.step() if o.finished)
            stats = sched.stats().kv_connector
    finally:
        release.set()
    assert q_done_first  # q ran to the end while p's lookup hung
    assert {rid: list(o.outputs[0].token_ids) for rid, o in outs.items()} == want
    assert [outs[k].num_cached_tokens for k in "pqr"] == [0, 40, 0]
    assert stats == dict(queries=3 * 42, hits=40, blocks_loaded=10, blocks_saved=0,
                         save_failures=0, load_failures=0, lookup_timeouts=1, store_down=1,
                         lookups_skipped=1, saves_skipped=0,
                         remote_prefill_fallbacks=0)


def test_saves_count_once_written_and_failed_writes_as_failures(tiny_model_dir, tmp_path, monkeypatch):
    """A producer without wait_for_save (its outputs never wait for the files): its stats count
    blocks as saved once written, and a write that fails (a full disk, here every third)
    as a save failure, exactly, by the time generate returns; only the written blocks have
    files, and a consumer finds the run of them up to the first failure."""
    from tessellm.kv_transfer import shared_storage_format as fmt

    model = tiny_model_dir("llama")
    prompts = _prompts(2)
    calls, lock = [0], threading.Lock()
    real = fmt.write_block

    def full_disk(path, *args):
        with lock:
            calls[0] += 1
            fail = calls[0] % 3 == 0
        if fail:
            raise OSError(28, "No space left on device")
        return real(path, *args)

    monkeypatch.setattr(fmt, "write_block", full_disk)
    _, stats = _run(model, prompts, kv_transfer_config=_kv(tmp_path, "kv_producer"))
    conn = stats.kv_connector
    assert calls[0] == 2 * 11 and conn["save_failures"] == 2 * 11 // 3
    assert conn["blocks_saved"] == 2 * 11 - 2 * 11 // 3 == len(_files(tmp_path))
    monkeypatch.setattr(fmt, "write_block", real)
    # A second producer engine finds every block there but the failed ones and writes those.
    _, stats = _run(model, prompts, kv_transfer_config=_kv(tmp_path, "kv_producer"))
    assert (stats.kv_connector["blocks_saved"], stats.kv_connector["save_failures"]) == (2 * 11, 0)
    assert len(_files(tmp_path)) == 2 * 11



def test_producer_returns_its_tokens_before_a_hung_disk_has_its_files(tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    """The producer's saves are off its request's path: with its disk hung (every block write
    on the real writer thread waits until the disk is released), the engine's steps still give
    the request its tokens (HF's) to the end while not one file is written; once the disk is
    back the 11 blocks are written whole and counted, and a consumer loads 40 tokens of them
    and gives HF's tokens."""
    from tessellm.kv_transfer import shared_storage_format as fmt

    model = tiny_model_dir("llama")
    prompts = _prompts(1)
    want = hf_greedy(model, prompts, 6)
    release, real, waiting = threading.Event(), fmt.write_block, []

    def hung_disk(path, *args):
        waiting.append(path)
        assert release.wait(60), "the test never released the disk"
        return real(path, *args)

    monkeypatch.setattr(fmt, "write_block", hung_disk)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    # The disk hangs on purpose for as long as the request runs: the connector's hang detector
    # (a store call not back after lookup_timeout_ms, 5 s by default, marks the store down and
    # gives the saves up) waits longer than this test can take, or a slow machine (two test
    # workers, other load) trips it before the disk is released (seen: no save reached the disk).
    kv = _kv(tmp_path, "kv_producer")
    kv["kv_connector_extra_config"]["lookup_timeout_ms"] = 120_000
    try:
        with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=32,
                 max_model_len=128, kv_transfer_config=kv) as llm:
            engine, out = llm.engine, None
            engine.add_request("p", {"prompt_token_ids": prompts[0]}, params)
            deadline = time.monotonic() + 60
            while out is None and time.monotonic() < deadline:
                out = next((o for o in engine.step() if o.request_id == "p" and o.finished), None)
            assert out is not None and list(out.outputs[0].token_ids) == want[0]
            assert waiting and _files(tmp_path) == []  # its saves under way, none written
            assert engine.core.scheduler.stats().kv_connector["blocks_saved"] == 0
            release.set()
            while engine.has_unfinished_requests():  # the saves settle
                engine.step()
            assert engine.core.scheduler.stats().kv_connector["blocks_saved"] == 11
    finally:
        release.set()
    assert len(_files(tmp_path)) == 11
    monkeypatch.setattr(fmt, "write_block", real)
    rows, stats = _run(model, prompts, kv_transfer_config=_kv(tmp_path, "kv_consumer"))
    assert rows == [(want[0], 40, 2 + 5)] and stats.kv_connector["load_failures"] == 0


_PRODUCER = """
import json, sys
from tessellm import LLM, SamplingParams
model, port, prompts, tp = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
kv = {"kv_connector": "ZmqPeerConnector", "kv_role": "kv_producer",
      "kv_connector_extra_config": {"kv_port": port}}
with LLM(model, device="cpu", dtype="float32", block_size=4, num_kv_blocks=32, max_model_len=128,
         tensor_parallel_size=tp, kv_transfer_config=kv) as llm:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.core.scheduler.stats().kv_connector
    print(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs], "stats": stats}),
          flush=True)
    sys.stdin.readline()  # serves its blocks until the test is done
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peer(role: str, **extra) -> dict:
    return {"kv_connector": "ZmqPeerConnector", "kv_role": role, "kv_connector_extra_config": extra}


def _producer_process(model: str, port: int, prompts: list, tp: int = 1):
    """A producer engine in another process: its tokens and stats once its saves are in its
    store; it serves them until its stdin closes."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _PRODUCER, model, str(port), json.dumps(prompts),
                             str(tp)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.stdin.close()
        raise AssertionError(f"the producer process ended with {proc.wait(120)} before its output")
    return proc, json.loads(line)


def test_zmq_peer_prefill_in_one_process_decode_in_another(tiny_model_dir, caplog):
    """Disaggregated prefill over TCP, no shared files: a producer engine in another process
    prefills two prompts and serves their blocks from its host memory; this process's consumer
    engine loads their 40 tokens each over the socket (in the background, and in the step that
    admits them), computes 2 prompt tokens and 5 decodes, and gives HF's tokens and the
    producer's; the stats are exact on both sides. A consumer of another block size (another
    namespace) is told so in its log, shares nothing and still gives HF's tokens."""
    model = tiny_model_dir("llama")
    prompts = _prompts(2)
    want = hf_greedy(model, prompts, 6)
    port = _free_port()
    proc, made = _producer_process(model, port, prompts)
    try:
        assert made["tokens"] == want
        assert made["stats"] == dict(queries=2 * 42, hits=0, blocks_loaded=0, blocks_saved=2 * 11,
                                     save_failures=0, load_failures=0, lookup_timeouts=0,
                                     store_down=0, lookups_skipped=0, saves_skipped=0,
                                     remote_prefill_fallbacks=0)
        for load_async in (True, False):
            consumer = _peer("kv_consumer", kv_peer=f"127.0.0.1:{port}", load_async=load_async)
            rows, stats = _run(model, prompts, kv_transfer_config=consumer)
            assert rows == [(w, 40, 2 + 5) for w in want]
            assert stats.kv_connector == dict(queries=2 * 42, hits=2 * 40, blocks_loaded=20,
                                              blocks_saved=0, save_failures=0, load_failures=0,
                                              lookup_timeouts=0, store_down=0,
                                              lookups_skipped=0, saves_skipped=0,
                                              remote_prefill_fallbacks=0)
        with LLM(model, device="cpu", dtype="float32", block_size=8, num_kv_blocks=16,
                 max_model_len=128, kv_transfer_config=_peer("kv_consumer", kv_peer=f"127.0.0.1:{port}")) as llm:
            out = llm.generate({"prompt_token_ids": prompts[0]},
                               SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
            assert list(out[0].outputs[0].token_ids) == want[0] and out[0].num_cached_tokens == 0
        assert "serves namespace" in caplog.text and "no block is shared" in caplog.text
    finally:
        proc.stdin.close()
        assert proc.wait(120) == 0


def test_zmq_peer_down_costs_one_lookup_timeout_not_one_per_request(tiny_model_dir, caplog):
    """A consumer whose producer does not answer (nothing listens on kv_peer): its first
    request's lookup times out and counts as a miss (recomputed: HF's tokens); the peer is then
    not asked for a while, so the next requests are not held by lookups (one warning, not one
    per request)."""
    model = tiny_model_dir("llama")
    prompts = _prompts(3)
    want = hf_greedy(model, prompts, 6)
    consumer = _peer("kv_consumer", kv_peer=f"127.0.0.1:{_free_port()}", timeout_s=0.5)
    rows, stats = _run(model, prompts, kv_transfer_config=consumer)
    assert rows == [(w, 0, 42 + 5) for w in want]
    assert stats.kv_connector["hits"] == 0 and stats.kv_connector["load_failures"] == 0
    assert caplog.text.count("did not answer in 0.5 s") == 1


def test_zmq_peer_shutdown_frees_its_port_threads_and_sockets(tiny_model_dir):
    """A kv_both engine serving its blocks and fetching them from itself (kv_peer: its own
    port; p again after q pushed p's blocks out of the device cache loads them over the socket):
    once it is shut down its port binds again at once, no connector thread is left, and its
    sockets and ZeroMQ context are closed (the descriptors they held are given back)."""
    import zmq

    model = tiny_model_dir("llama")
    p, q = _prompts(2)
    want = hf_greedy(model, [p], 6)[0]
    port = _free_port()
    fds = len(os.listdir("/proc/self/fd"))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    kv = _peer("kv_both", kv_port=port, kv_peer=f"127.0.0.1:{port}")
    with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=16,
             max_model_len=64, kv_transfer_config=kv) as llm:
        for prompt in (p, q, p):
            out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == want
        assert llm.engine.core.scheduler.stats().kv_connector["hits"] > 0  # over the socket
        halves = [llm.engine.core.scheduler.connector, llm.engine.core.runner.kv_connector]
    assert all(half._zmq.closed for half in halves)  # every socket closed, the context ended
    assert not [t.name for t in threading.enumerate() if t.name.startswith("tessellm-kv")]
    assert len(os.listdir("/proc/self/fd")) <= fds
    ctx = zmq.Context()
    try:
        ctx.socket(zmq.ROUTER).bind(f"tcp://127.0.0.1:{port}")  # free again
    finally:
        ctx.destroy(linger=0)


def test_zmq_peer_bad_settings_are_one_clear_error(tiny_model_dir):
    ctx = KVConnectorContext(BS, "ns")
    for role, extra, match in (
            ("kv_consumer", {"kv_peer": "host:0"}, "kv_peer is the default producer's 'host:port'"),
            ("kv_both", {"kv_peer": "nohost"}, "the default producer's 'host:port'"),
            ("kv_producer", {"kv_host": "0.0.0.0"}, "kv_host is the address consumers reach"),
            ("kv_producer", {"kv_host": "0::0"}, "kv_host is the address consumers reach"),
            ("kv_producer", {"kv_host": "[0:0::]"}, "kv_host is the address consumers reach"),
            ("kv_producer", {"kv_port": 0}, "kv_port is the TCP port"),
            ("kv_producer", {"store_bytes": -1}, "store_bytes is the host memory"),
            ("kv_producer", {"store_ahead_bytes": -1}, "store_ahead_bytes is the host memory"),
            ("kv_producer", {"store_down_ms": "5"}, "store_down_ms is how long"),
            ("kv_producer", {"timeout_s": "5"}, "timeout_s is how long"),
            ("kv_producer", {"shared_storage_path": "/tmp"}, r"unknown key\(s\) \['shared_storage_path'\]")):
        with pytest.raises(ValueError, match=match):
            make_connector(parse_kv_transfer_config(_peer(role, **extra)), KVConnectorRole.SCHEDULER, ctx)
    import zmq

    taken = zmq.Context.instance().socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port} .* another kv_port"):
            LLM(tiny_model_dir("llama"), device="cpu", block_size=BS, num_kv_blocks=16,
                max_model_len=64, kv_transfer_config=_peer("kv_producer", kv_port=port))
    finally:
        taken.close(0)


@pytest.mark.slow  # ~40 s on 2 cores: four worker processes
def test_zmq_peer_tensor_parallel_ranks_fetch_from_their_peer_rank(tiny_model_dir):
    """Two tensor-parallel ranks on each side: producer rank r serves its shard on kv_port + r,
    consumer rank r fetches it from there; HF's tokens, 40 tokens loaded, exact stats (the
    producer's saves count its output rank's blocks). A consumer without kv_peer whose request
    names the producer (kv_transfer_params, routed: where travels to the worker processes in
    the step's metadata) loads the same from it."""
    model = tiny_model_dir("llama")
    prompts = _prompts(1)
    want = hf_greedy(model, prompts, 6)
    port = _free_port()
    proc, made = _producer_process(model, port, prompts, tp=2)
    try:
        assert made["tokens"] == want and made["stats"]["blocks_saved"] == 11
        rows, stats = _run(model, prompts, tensor_parallel_size=2,
                           kv_transfer_config=_peer("kv_consumer", kv_peer=f"127.0.0.1:{port}"))
        assert rows == [(want[0], 40, 7)]
        assert (stats.kv_connector["hits"], stats.kv_connector["load_failures"]) == (40, 0)
        routed = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": port, "tp_size": 2}
        with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=32,
                 max_model_len=128, tensor_parallel_size=2,
                 kv_transfer_config=_peer("kv_consumer", allowed_producers=["127.0.0.1"])) as llm:
            out = llm.generate({"prompt_token_ids": prompts[0]},
                               SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                              kv_transfer_params=routed), use_tqdm=False)[0]
            assert (list(out.outputs[0].token_ids), out.num_cached_tokens) == (want[0], 40)
            stats = llm.engine.core.scheduler.stats().kv_connector
            assert (stats["hits"], stats["remote_prefill_fallbacks"]) == (40, 0)
    finally:
        proc.stdin.close()
        assert proc.wait(120) == 0


def test_zmq_peer_block_server_protocol(monkeypatch):
    """The producer's block store and server and the consumer's half, in one process over
    loopback: "has" counts the run held (the scheduler half's lookup, per rank), "get" fills
    a block's views and checks it as a file (one message, or several in flight) (a byte flipped under crc32 fails and is dropped at
    the producer, so the next lookup misses it), another namespace shares nothing, and the
    store evicts its least recently used block past its bytes. A request without the protocol's
    version frame, of another version, with a key not ASCII or an unknown op gets one error
    naming it; a reply carries its request's tag. A store slot whose block went while it was
    being sent is not written again until the send is done; a producer's store makes its
    slots ahead of the puts."""
    from tessellm.kv_transfer import shared_storage_format as fmt
    from tessellm.kv_transfer import zmq_peer
    from tessellm.kv_transfer.zmq_peer import BlockServer, BlockStore

    port = _free_port()
    keys = [f"{i:064x}" for i in range(4)]
    layout = bytes(16)
    store = BlockStore(capacity=10 * (HEADER_BYTES + 16))
    for i, key in enumerate(keys[:3]):
        payload = [memoryview(bytes([i + 1]) * 16)]
        store.put(key, fmt.block_header(key, 0, "crc32", layout, 16, payload, None) + bytes(payload[0]))
    import zmq

    server_zmq = zmq.Context()
    server = BlockServer(store, "ns", "127.0.0.1", port, server_zmq)
    conn = other = None
    try:
        config = parse_kv_transfer_config(_peer("kv_consumer", kv_peer=f"127.0.0.1:{port}"))
        conn = make_connector(config, KVConnectorRole.WORKER, KVConnectorContext(BS, "ns"))
        conn.layout, conn.block_bytes = layout, 16
        assert conn._look(keys, 0) == (keys[:3], 3)
        for per_message in (64, 1):  # one "get", and four in flight (one block each)
            monkeypatch.setattr(zmq_peer, "_GET_MAX", per_message)
            views = [[memoryview(bytearray(16))] for _ in keys]
            got = conn.read_blocks(keys, views)
            assert [g is not None for g in got] == [True, True, True, False]
            assert [bytes(v[0]) for v in views[:3]] == [bytes([i + 1]) * 16 for i in range(3)]
        bad = bytearray(store.blob(keys[1]))
        bad[-1] ^= 0x5A
        store.put(keys[1], bytes(bad))
        assert [g is not None for g in conn.read_blocks(keys[:3], views[:3])] == [True, False, True]
        assert conn._look(keys, 0) == (keys[:1], 1)  # dropped at the producer
        other = make_connector(config, KVConnectorRole.SCHEDULER, KVConnectorContext(BS, "other"))
        assert other._look(keys, 0) == ([], 0)
        # anyone may connect: a malformed request gets an error, the server goes on
        raw = server_zmq.socket(zmq.DEALER)
        raw.connect(f"tcp://127.0.0.1:{port}")
        try:
            for bad, why in (([b"has"], b"the first not tslkv-peer/2"),
                             ([b"get", b"ns", keys[0].encode()], b"the first not tslkv-peer/2"),
                             ([b"tslkv-peer/1", b"get", b"ns", b"1", keys[0].encode()],
                              b"another tessellm version"),
                             ([zmq_peer.PROTOCOL, b"get", b"ns", b"1", b"\xff"], b"UnicodeDecodeError"),
                             ([zmq_peer.PROTOCOL, b"put", b"ns", b"1"], b"unknown op")):
                raw.send_multipart(bad)
                assert raw.poll(5000), f"no reply to {bad}"
                reply = raw.recv_multipart()
                assert reply[0] == b"error" and b"bad request" in reply[1] and why in reply[1], reply
            raw.send_multipart([zmq_peer.PROTOCOL, b"get", b"ns", b"7", keys[0].encode()])
            assert raw.poll(5000)
            assert raw.recv_multipart() == [b"ok", b"7", store.blob(keys[0])]  # the tag echoed
        finally:
            raw.close(0)
        assert conn._look(keys, 0) == (keys[:1], 1) and server.thread.is_alive()
    finally:
        server.close()
        server_zmq.term()
        for half in (conn, other):
            if half is not None:
                half.shutdown()
    small = BlockStore(capacity=2 * 10)
    for key in keys[:3]:
        small.put(key, bytes(10))
    assert list(small.blocks) == keys[1:3] and small.nbytes == 20
    # a slot being sent is not written until ZeroMQ is done with it (its tracker)
    slots = BlockStore(capacity=2 * 10)
    slots.put(keys[0], bytes([1]) * 10)
    blobs, pinned = slots.get([keys[0]])
    sent = types.SimpleNamespace(done=False)
    slots.track(sent, pinned)
    slots.drop([keys[0]])
    slots.put(keys[1], bytes([2]) * 10)
    slots.put(keys[2], bytes([3]) * 10)  # evicts keys[1]: the slot being sent stays as it was
    assert bytes(blobs[0]) == bytes([1]) * 10 and list(slots.blocks) == [keys[2]]
    sent.done = True
    slots.put(keys[3], bytes([4]) * 10)
    assert slots.blob(keys[2]) == bytes([3]) * 10 and slots.blob(keys[3]) == bytes([4]) * 10
    # a producer's store makes its slots ahead of the puts (a thread of its own, up to capacity)
    ahead = BlockStore(capacity=8 * 10, slot_bytes=10)
    deadline = time.monotonic() + 10
    while len(ahead.free) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(ahead.slots) == len(ahead.free) == 8
    ahead.put(keys[0], bytes([5]) * 10)
    assert ahead.blob(keys[0]) == bytes([5]) * 10 and len(ahead.slots) == 8
    ahead.close()
    assert not ahead._grower


def test_zmq_peer_store_makes_its_memory_on_demand():
    """A producer's block store of 512 MiB of 2 MiB blocks makes and touches 64 MiB ahead of
    its saves at start (the default ``store_ahead_bytes``; session 21's made the whole 512 MiB,
    up to 1 GiB): an idle producer's resident memory grows by that, not by its store. Saves
    that outrun the window double it (up to the store), and the thread ahead then makes it;
    every block comes back byte for byte. ``store_ahead_bytes`` 0 makes nothing ahead."""
    from tessellm.kv_transfer.zmq_peer import BlockStore

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    slot = 2 << 20
    before = resident()
    store = BlockStore(capacity=256 * slot, slot_bytes=slot)
    try:
        deadline = time.monotonic() + 10
        while len(store.free) * slot < store.ahead and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert store.ahead == 64 << 20 and len(store.slots) == len(store.free) == 32
        assert resident() - before < 160 << 20  # the 64 MiB ahead (the old store: 512 MiB)
        with store.lock:
            store._growing = True  # the thread ahead held back: the puts outrun it
        blocks = [np.full(slot, i, np.uint8) for i in range(40)]
        keys = [f"{i:064x}" for i in range(40)]
        for key, blob in zip(keys, blocks):
            store.put(key, blob)
        assert store.ahead == 128 << 20  # the window doubled (one slab made in the puts' path)
        with store.lock:
            store._growing = False
            store._wake.notify()
        while len(store.free) * slot < store.ahead and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(store.free) == 64 and len(store.slots) == 40 + 64 <= 256
        assert all(store.blob(k) == b.tobytes() for k, b in zip(keys, blocks))
    finally:
        store.close()
    idle = BlockStore(capacity=8 * slot, slot_bytes=slot, ahead_bytes=0)
    assert idle._grower is None and not idle.slots
    idle.put(keys[0], blocks[0])
    assert idle.blob(keys[0]) == blocks[0].tobytes() and len(idle.slots) == 8  # one slab
