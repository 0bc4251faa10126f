"""KV loads whose store dies under them (tessellm/kv_transfer): a block file that turns into a
reader that never answers (a FIFO swapped in after the lookup saw the file), a producer's
server thread stopped mid-load, a read cancelled under a load, and a shutdown while a load
hangs. Every such load is bounded (``lookup_timeout_ms``, ZmqPeer's ``timeout_s``): it fails,
its request computes its prompt and gives HF's greedy tokens, the failure is counted, other
requests load and run as before, and shutdown returns in bound without a traceback."""

from __future__ import annotations

import logging
import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.kv_transfer import KVConnectorRole
from tests.conftest import hf_greedy
from tests.core.test_kv_transfer import (BS, _connector, _free_port, _kv, _peer, _prompts,
                                         _release_fifo, _run)


def _keys(path, prompt) -> tuple:
    (ns,) = os.listdir(path)
    conn = _connector(path, ns)
    keys = conn.block_keys(SimpleNamespace(request_id="x", all_token_ids=prompt, lora_request=None,
                                           block_key=lambda a, b, lora: None))
    return conn, keys


def _hang(conn, key) -> str:
    """The block's file becomes a FIFO nobody writes (same name): opening it to read blocks."""
    path = conn.path(key, 0)
    os.mkfifo(path + ".fifo")
    os.replace(path + ".fifo", path)
    return path


def _step_until_looked_up(engine, sched, rid: str) -> None:
    """One step (``lookup_wait_ms`` 0: the request's lookup starts and answers "not yet"), then
    wait until the lookup came back, before its load starts. Not a step per wait: a lookup done
    after a wait ran out and before the next step was taken by that step, its load started,
    and the request's lookup was never seen done (a loaded machine)."""
    engine.step()
    deadline = time.monotonic() + 30
    while True:
        look = sched.connector._lookups.get(rid)
        assert look is not None and look.future is not None, f"{rid}'s lookup did not start"
        if look.future.done():
            return
        assert time.monotonic() < deadline, "the lookup never came back"
        sched.connector.wait_for_lookups(0.05)


def _drive(engine, deadline_s: float) -> dict:
    outs, t0 = {}, time.monotonic()
    while engine.has_unfinished_requests():
        assert time.monotonic() - t0 < deadline_s, "a request hangs"
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    return outs


@pytest.mark.parametrize("load_async", [True, False], ids=["background", "in-step"])
def test_a_load_whose_file_hangs_is_given_up_and_recomputed(load_async, tiny_model_dir, tmp_path,
                                                            caplog):
    """p's lookup sees its 10 blocks' files; then block 5's file becomes a reader that never
    answers (a FIFO: the read of its header blocks, as on a hung mount). p's load is given up
    after ``lookup_timeout_ms`` (0.4 s): its blocks are freed, it computes its prompt and gives
    HF's tokens; q, in the store too, added meanwhile, loads its 40 tokens and runs as if
    nothing happened. One load failure counted; the engine's blocks all come back."""
    model = tiny_model_dir("llama")
    p, q = _prompts(2, seed=5)
    want = dict(zip("pq", hf_greedy(model, [p, q], 6)))
    _run(model, [p, q], kv_transfer_config=_kv(tmp_path, "kv_producer"))
    conn, keys = _keys(tmp_path, p)
    kv = _kv(tmp_path, "kv_consumer")
    kv["kv_connector_extra_config"].update(lookup_wait_ms=0, lookup_timeout_ms=400,
                                           load_async=load_async, io_threads=2)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    fifo = None
    try:
        with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=64,
                 max_model_len=128, kv_transfer_config=kv) as llm:
            engine, sched = llm.engine, llm.engine.core.scheduler
            engine.add_request("p", {"prompt_token_ids": p}, params)
            _step_until_looked_up(engine, sched, "p")
            fifo = _hang(conn, keys[5])
            engine.add_request("q", {"prompt_token_ids": q}, params)
            t0 = time.monotonic()
            outs = _drive(engine, 20)
            took = time.monotonic() - t0
            stats = sched.stats().kv_connector
            assert not sched.kv_loading and sched.kv.num_free_blocks == 64
    finally:
        if fifo is not None:
            _release_fifo(fifo)
    assert {rid: list(o.outputs[0].token_ids) for rid, o in outs.items()} == want
    assert (outs["p"].num_cached_tokens, outs["q"].num_cached_tokens) == (0, 40)
    assert stats["load_failures"] == 1 and stats["hits"] == 40 and stats["blocks_loaded"] == 10
    assert 0.4 <= took < 10
    assert "counts as down (a read not done after" in caplog.text
    assert "Traceback" not in caplog.text


def test_a_peer_stopped_mid_load_is_a_recompute(tiny_model_dir):
    """ZmqPeer: a producer engine serves p's blocks; the consumer's lookup finds them, then the
    producer's server thread is stopped (its socket closed: the peer gone mid-transfer). The
    consumer's load waits ``timeout_s`` (0.5 s) for a reply, fails, and p computes its prompt
    with HF's tokens, counted as a load failure; the consumer's next request runs at once."""
    model = tiny_model_dir("llama")
    p, q = _prompts(2, seed=7)
    want = dict(zip("pq", hf_greedy(model, [p, q], 6)))
    port = _free_port()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=32,
             max_model_len=128, kv_transfer_config=_peer("kv_producer", kv_port=port)) as producer:
        producer.generate({"prompt_token_ids": p}, params, use_tqdm=False)
        consumer_kv = _peer("kv_consumer", kv_peer=f"127.0.0.1:{port}", timeout_s=0.5,
                            lookup_wait_ms=0)
        with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=32,
                 max_model_len=128, kv_transfer_config=consumer_kv) as llm:
            engine, sched = llm.engine, llm.engine.core.scheduler
            engine.add_request("p", {"prompt_token_ids": p}, params)
            _step_until_looked_up(engine, sched, "p")
            server = producer.engine.core.runner.kv_connector._server
            server.close()  # the peer is gone: nothing answers the load's "get"
            t0 = time.monotonic()
            outs = _drive(engine, 20)
            assert time.monotonic() - t0 < 5
            engine.add_request("q", {"prompt_token_ids": q}, params)
            outs.update(_drive(engine, 20))
            stats = sched.stats().kv_connector
            assert sched.kv.num_free_blocks == 32
        producer.engine.core.runner.kv_connector._server = None  # closed above
    assert {rid: list(o.outputs[0].token_ids) for rid, o in outs.items()} == want
    assert outs["p"].num_cached_tokens == 0 and stats["load_failures"] == 1
    assert stats["hits"] == 0


def test_shutdown_while_a_load_hangs_returns_in_bound_without_a_traceback(tiny_model_dir,
                                                                          tmp_path, caplog):
    """A consumer engine whose background load hangs on a file (a FIFO; ``lookup_timeout_ms``
    30 s, so only the shutdown ends it) is shut down mid-load: it returns within 5 s (about
    one), logs no traceback and no error, and leaves only daemon threads (the hung read)."""
    caplog.set_level(logging.INFO)
    model = tiny_model_dir("llama")
    (p,) = _prompts(1, seed=9)
    _run(model, [p], kv_transfer_config=_kv(tmp_path, "kv_producer"))
    conn, keys = _keys(tmp_path, p)
    kv = _kv(tmp_path, "kv_consumer")
    kv["kv_connector_extra_config"].update(lookup_wait_ms=0, lookup_timeout_ms=30000)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    fifo = None
    try:
        llm = LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=32,
                  max_model_len=128, kv_transfer_config=kv)
        engine, sched = llm.engine, llm.engine.core.scheduler
        engine.add_request("p", {"prompt_token_ids": p}, params)
        _step_until_looked_up(engine, sched, "p")
        fifo = _hang(conn, keys[0])
        for _ in range(5):
            engine.step()
        assert "p" in sched.kv_loading  # its load hangs on the FIFO
        t0 = time.monotonic()
        llm.shutdown()
        assert time.monotonic() - t0 < 5
    finally:
        if fifo is not None:
            _release_fifo(fifo)
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("tessellm-kv"))


def test_a_load_whose_reads_are_cancelled_fails_and_frees_its_buffer(tmp_path):
    """The worker half: a load in the step whose reads are queued behind a read that hangs
    (one reader thread, busy with a background load on a FIFO) and then cancelled (the reader
    pool shut down with its queue cancelled, as at shutdown) returns its request as failed, no
    CancelledError raised into the step; the background load on the FIFO fails too once the
    FIFO gives EOF, and a new reader pool loads again (the buffers were not lost)."""
    from tessellm.backends.reference.kv_transfer import swap_blocks
    from tessellm.kv_transfer.threads import DaemonPool

    caches = [torch.randn(16, BS, 2, 8)]
    conn = _connector(tmp_path, "ns", KVConnectorRole.WORKER, io_threads=1,
                      lookup_timeout_ms=30000)
    conn.register_kv_caches(caches, swap_blocks, lambda: None, torch.device("cpu"))
    conn.save_kv({"saves": [["a", 1], ["b", 2]]})
    conn.wait_for_save()
    os.mkfifo(conn.path("hang", 0))
    conn.start_load_kv({"async_loads": [["bg", [["hang", 5]]]]})
    _until(lambda: conn._read_since, "the only reader thread to start bg's read (the FIFO's open)")
    got = []
    step = threading.Thread(target=lambda: got.append(conn.start_load_kv({"loads": [["r", [["a", 6]]]]})))
    step.start()
    _until(lambda: not conn._readers._state.queue.empty(), "r's read to queue behind bg's")
    conn._readers.shutdown(wait=False, cancel_futures=True)  # r's queued read: cancelled
    step.join(5)
    assert not step.is_alive() and got == [["r"]]
    _release_fifo(conn.path("hang", 0))
    assert conn.get_finished_loads(["bg"], timeout=5) == {"bg": False}
    conn._readers = DaemonPool(1, "tessellm-kv-read")
    assert conn.start_load_kv({"loads": [["r2", [["a", 7], ["b", 8]]]]}) == []
    assert torch.equal(caches[0][7], caches[0][1]) and torch.equal(caches[0][8], caches[0][2])
    conn.shutdown()


def test_zmq_peer_shutdown_while_a_load_waits_for_a_gone_peer(tiny_model_dir, caplog):
    """ZmqPeer with ``timeout_s`` 30: the producer's server stops after the consumer's lookup
    found p's blocks, so p's load waits for a reply that never comes; the consumer engine
    shut down then returns within 5 s (about two; ``lookup_timeout_ms``, its threads' bound at
    shutdown, is 20 s: the reader's wait for the reply ends on the stop, its
    socket is closed after it, not under it), with no traceback and no connector thread left
    reading."""
    caplog.set_level(logging.INFO)
    model = tiny_model_dir("llama")
    (p,) = _prompts(1, seed=11)
    port = _free_port()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=32,
             max_model_len=128, kv_transfer_config=_peer("kv_producer", kv_port=port)) as producer:
        producer.generate({"prompt_token_ids": p}, params, use_tqdm=False)
        llm = LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=32,
                  max_model_len=128, kv_transfer_config=_peer(
                      "kv_consumer", kv_peer=f"127.0.0.1:{port}", timeout_s=30, lookup_wait_ms=0,
                      lookup_timeout_ms=20000))
        engine, sched = llm.engine, llm.engine.core.scheduler
        engine.add_request("p", {"prompt_token_ids": p}, params)
        _step_until_looked_up(engine, sched, "p")
        server = producer.engine.core.runner.kv_connector._server
        server.close()
        producer.engine.core.runner.kv_connector._server = None
        for _ in range(5):
            engine.step()
        assert "p" in sched.kv_loading  # its "get" waits for the gone peer
        halves = [sched.connector, llm.engine.core.runner.kv_connector]
        t0 = time.monotonic()
        llm.shutdown()
        assert time.monotonic() - t0 < 5
        assert all(half._zmq.closed for half in halves)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("tessellm-kv-read")]
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]



def _until(condition, what: str, seconds: float = 30) -> None:
    """Until ``condition()`` holds (another thread got that far), ``seconds`` at most: a wait
    for the state the next step needs, not a sleep that a loaded machine outlasts."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.01)


def _wait_for_hung_reads(conn, seconds: float = 5) -> None:
    """Until the worker's hung reads have returned (the FIFO released: EOF, a miss)."""
    _until(lambda: not conn._read_since, "the hung reads to return", seconds)

def test_loads_behind_reader_threads_that_all_hang_fail_at_once(tmp_path):
    """The worker half with one reader thread: a load whose file hangs (a FIFO) fails after
    ``lookup_timeout_ms`` (0.3 s) and marks the store down; the next load, whose read cannot
    start while the only reader hangs, fails at once; once the FIFO answers, loads work again
    (nothing lost: the staging buffer the hung read held was replaced)."""
    from tessellm.backends.reference.kv_transfer import swap_blocks

    caches = [torch.randn(16, BS, 2, 8)]
    conn = _connector(tmp_path, "ns", KVConnectorRole.WORKER, io_threads=1, lookup_timeout_ms=300)
    conn.register_kv_caches(caches, swap_blocks, lambda: None, torch.device("cpu"))
    conn.save_kv({"saves": [["a", 1]]})
    conn.wait_for_save()
    fifo = conn.path("hang", 0)
    os.mkfifo(fifo)
    try:
        t0 = time.monotonic()
        assert conn.start_load_kv({"loads": [["r1", [["hang", 5]]]]}) == ["r1"]
        assert 0.3 <= time.monotonic() - t0 < 3 and conn.health.is_down
        t0 = time.monotonic()
        conn.start_load_kv({"async_loads": [["r2", [["a", 6]]]]})
        assert conn.get_finished_loads(["r2"], timeout=5) == {"r2": False}
        assert time.monotonic() - t0 < 0.25
    finally:
        _release_fifo(fifo)
    _wait_for_hung_reads(conn)
    assert conn.start_load_kv({"loads": [["r3", [["a", 7]]]]}) == []
    assert torch.equal(caches[0][7], caches[0][1])
    conn.shutdown()


def test_a_given_up_load_takes_back_its_reads_not_started(tmp_path):
    """A load given up while its reads wait behind a hung one (one reader thread) cancels
    them: they never read the store later (for a load nobody waits for), and its staging
    buffer goes back to the pool instead of being lost (a hung store would otherwise cost a
    new pinned buffer per load)."""
    from tessellm.backends.reference.kv_transfer import swap_blocks

    caches = [torch.randn(16, BS, 2, 8)]
    conn = _connector(tmp_path, "ns", KVConnectorRole.WORKER, io_threads=1, lookup_timeout_ms=300)
    conn.register_kv_caches(caches, swap_blocks, lambda: None, torch.device("cpu"))
    conn.save_kv({"saves": [["a", 1]]})
    conn.wait_for_save()
    reads = []
    read_run = conn.read_run
    conn.read_run = lambda keys, *rest: (reads.extend(keys), read_run(keys, *rest))[1]
    fifo = conn.path("hang", 0)
    os.mkfifo(fifo)
    try:
        assert conn.start_load_kv({"loads": [["r1", [["hang", 5]]]]}) == ["r1"]
        staging = conn._load_staging
        made = staging.made  # r1's buffer is lost (its read still hangs in the FIFO)
        conn.start_load_kv({"async_loads": [["r2", [["a", 6]]]]})
        assert conn.get_finished_loads(["r2"], timeout=5) == {"r2": False}
        assert staging.made == made + 1 and len(staging.free) == 1  # r2's buffer is back
    finally:
        _release_fifo(fifo)
    _wait_for_hung_reads(conn)
    time.sleep(0.1)
    assert reads == ["hang"]  # r2's read was never made
    conn.shutdown()
