"""Per-request ``kv_transfer_params`` that route (vLLM's disaggregation proxy flow, xPyD): a
``ZmqPeerConnector`` producer hands back where its blocks are (``RequestOutput.kv_transfer_params``)
for a ``do_remote_decode`` request, and a consumer given those params fetches the request's
blocks from *that* producer: two producers behind one consumer, each prompt's blocks from its
own, greedy tokens equal to a plain engine's. A producer that is gone, or holds no such
blocks, costs its request a recompute (counted), never another request's load; a malformed
object, or one naming a producer the consumer does not fetch from, is one error naming the
key."""

from __future__ import annotations

import time

import pytest

from tessellm import LLM, SamplingParams
from tests.core.test_kv_transfer import BS, _free_port, _peer, _prompts

# vLLM's toy proxy's prefill request carries these (its NIXL fields unset)
PREFILL = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
           "remote_block_ids": None, "remote_host": None, "remote_port": None}


def _llm(model: str, kv=None) -> LLM:
    return LLM(model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=32,
               max_model_len=128, kv_transfer_config=kv)


def _greedy(llm: LLM, prompt: list, max_tokens: int = 6, params=None):
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, kv_transfer_params=params)
    return llm.generate({"prompt_token_ids": prompt}, sp, use_tqdm=False)[0]


def _plain(model: str, prompts: list) -> list:
    with _llm(model) as llm:
        return [list(_greedy(llm, p).outputs[0].token_ids) for p in prompts]


@pytest.mark.parametrize("load_async", [True, False], ids=["background", "in-step"])
def test_two_producers_one_consumer_each_prompt_from_its_producer(load_async, tiny_model_dir):
    """xPyD: a proxy sends prompt A to producer 1 and prompt B to producer 2 (max_tokens 1,
    do_remote_decode), and each response's kv_transfer_params with the whole request to one
    consumer that has no kv_peer: it loads A's 40 tokens from producer 1 and B's 28 from
    producer 2 (neither holds the other's; both in one step's load, in the step or in the
    background), and gives a plain engine's greedy tokens. A request that names no producer
    computes its prompt (nothing asked)."""
    model = tiny_model_dir("llama")
    prompts = _prompts(2) + [_prompts(1, length=30, seed=7)[0]]
    prompts[1], prompts[2] = prompts[2], prompts[1]  # A: 42 tokens, B: 30, C: 42
    want = _plain(model, prompts)
    ports = [_free_port(), _free_port()]
    with _llm(model, _peer("kv_producer", kv_port=ports[0])) as p1, \
            _llm(model, _peer("kv_producer", kv_port=ports[1])) as p2, \
            _llm(model, _peer("kv_consumer", timeout_s=2.0, load_async=load_async,
                              allowed_producers=["*"])) as consumer:
        routed = []
        for producer, port, prompt, held in ((p1, ports[0], prompts[0], 40), (p2, ports[1], prompts[1], 28)):
            out = _greedy(producer, prompt, 1, PREFILL)
            params = out.kv_transfer_params
            assert params == {"do_remote_prefill": True, "do_remote_decode": False,
                              "remote_engine_id": params["remote_engine_id"],
                              "remote_host": "127.0.0.1", "remote_port": port, "tp_size": 1,
                              "remote_num_tokens": held}
            assert list(out.outputs[0].token_ids) == want[prompts.index(prompt)][:1]
            routed.append(params)
        assert routed[0]["remote_engine_id"] != routed[1]["remote_engine_id"]
        # a request without do_remote_decode gets none back
        assert _greedy(p1, prompts[2], 1).kv_transfer_params is None
        outs = consumer.generate([{"prompt_token_ids": p} for p in prompts[:2]],
                                 [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                 kv_transfer_params=params) for params in routed],
                                 use_tqdm=False)
        assert [(list(o.outputs[0].token_ids), o.num_cached_tokens) for o in outs] == [
            (want[0], 40), (want[1], 28)]
        assert [o.kv_transfer_params for o in outs] == [None, None]  # a consumer hands none back
        out = _greedy(consumer, prompts[2])  # no params, no kv_peer: computed
        assert (list(out.outputs[0].token_ids), out.num_cached_tokens) == (want[2], 0)
        stats = consumer.engine.core.scheduler.stats().kv_connector
        assert (stats["hits"], stats["blocks_loaded"], stats["remote_prefill_fallbacks"],
                stats["load_failures"]) == (68, 17, 0, 0)
        for producer in (p1, p2):
            assert producer.engine.core.scheduler.stats().kv_connector["blocks_saved"] >= 7


def test_a_routed_request_whose_producer_fails_is_recomputed_alone(tiny_model_dir, caplog):
    """A consumer whose kv_peer is producer 1: a request routed to a port where nothing listens
    is recomputed (a plain engine's tokens) and counted in remote_prefill_fallbacks, and the
    gone producer is not asked again meanwhile, while requests routed to producer 1 (its
    kv_peer) still load: the default store was never marked down. A request routed to a live
    producer that does not hold its blocks is a fallback too."""
    model = tiny_model_dir("llama")
    prompts = _prompts(3, seed=1)
    want = _plain(model, prompts)
    port, gone = _free_port(), _free_port()
    with _llm(model, _peer("kv_producer", kv_port=port)) as p1, \
            _llm(model, _peer("kv_consumer", kv_peer=f"127.0.0.1:{port}", timeout_s=0.5,
                              allowed_producers=["127.0.0.1"])) as consumer:
        params = [_greedy(p1, p, 1, PREFILL).kv_transfer_params for p in prompts[:2]]
        dead = dict(params[0], remote_port=gone)
        out = _greedy(consumer, prompts[0], params=dead)
        assert (list(out.outputs[0].token_ids), out.num_cached_tokens) == (want[0], 0)
        out = _greedy(consumer, prompts[1], params=params[1])  # its producer: loads
        assert (list(out.outputs[0].token_ids), out.num_cached_tokens) == (want[1], 40)
        out = _greedy(consumer, prompts[2], params=params[1])  # p1 never saw this prompt
        assert (list(out.outputs[0].token_ids), out.num_cached_tokens) == (want[2], 0)
        stats = consumer.engine.core.scheduler.stats().kv_connector
        assert (stats["remote_prefill_fallbacks"], stats["hits"], stats["store_down"],
                stats["lookups_skipped"], stats["load_failures"]) == (2, 40, 0, 0, 0)
    assert caplog.text.count(f"127.0.0.1:{gone} did not answer") == 1


@pytest.mark.parametrize("params,words", [
    ({"do_remote_prefill": "yes"}, ["do_remote_prefill", "true or false"]),
    ({"do_remote_prefill": True, "remote_host": "h", "remote_port": 70000}, ["remote_port", "1-65535"]),
    ({"do_remote_prefill": True, "remote_host": "h"}, ["remote_port is missing"]),
    ({"do_remote_prefill": True, "remote_host": 5, "remote_port": 1}, ["remote_host"]),
    ({"do_remote_decode": True, "do_remote_prefill": True}, ["not both"]),
    ({"tp_size": 0}, ["tp_size", ">= 1"]),
    ({"remote_block_ids": 3}, ["remote_block_ids"])])
def test_a_malformed_kv_transfer_params_is_one_error_naming_the_key(params, words):
    with pytest.raises(ValueError) as exc:
        SamplingParams(kv_transfer_params=params)
    assert all(w in str(exc.value) for w in ["kv_transfer_params", *words]), str(exc.value)


def test_proxy_params_and_other_connectors_keys_are_accepted():
    """What vLLM's proxy sends the prefill engine (nulls), and keys another connector reads,
    pass; a do_remote_prefill without a producer (the shared-storage flow) too."""
    for params in (PREFILL, {"do_remote_prefill": True, "remote_request_id": "x", "transfer_id": 3},
                   {"do_remote_prefill": True, "remote_host": None, "remote_port": None}):
        assert SamplingParams(kv_transfer_params=params).kv_transfer_params == params


def test_a_routed_producer_that_hangs_is_marked_down_alone(caplog):
    """A routed request's lookup not back within lookup_timeout_ms (its producer silent) is
    given up on (counted) and marks that producer down, not the connector's store: kv_peer's
    requests still look up, and the silent producer is not asked meanwhile."""
    from types import SimpleNamespace

    from tessellm.kv_transfer import (KVConnectorContext, KVConnectorRole, make_connector,
                                      parse_kv_transfer_config)

    silent, peer = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    kv = parse_kv_transfer_config(_peer("kv_consumer", kv_peer=peer, lookup_timeout_ms=100,
                                        allowed_producers=["127.0.0.1"]))
    conn = make_connector(kv, KVConnectorRole.SCHEDULER, KVConnectorContext(BS, "ns"))
    host, port = silent.split(":")
    params = {"do_remote_prefill": True, "remote_host": host, "remote_port": int(port)}
    req = SimpleNamespace(request_id="r", all_token_ids=list(range(3, 24)), num_tokens=21,
                          lora_request=None, block_key=lambda a, b, lora: None,
                          sampling_params=SimpleNamespace(kv_transfer_params=params))
    try:
        assert conn.get_num_new_matched_tokens(req, 0) == (None, False)  # asked, not back
        time.sleep(0.15)
        assert conn.get_num_new_matched_tokens(req, 0) == (0, False)  # given up
        assert (conn.stats.lookup_timeouts, conn.stats.store_down) == (1, 0)
        assert not conn.health.down()  # kv_peer's store: untouched
        assert conn._address(0, silent) is None and conn._address(0) == peer
        assert f"KV peer {silent}: a lookup not back" in caplog.text
    finally:
        conn.shutdown()


def test_allowed_producers_limits_whom_a_consumer_asks(tiny_model_dir, caplog):
    """Whom a consumer fetches from: by default its kv_peer alone (a request may not make it
    reach a host:port of the client's choosing), else the producers allowed_producers lists (by
    host, or by host:port), or any with ["*"]. A request naming another is refused at the edge,
    one error naming allowed_producers, before anything reaches the engine (the server's 400);
    one naming a listed producer loads. Past the edge (a core fed directly), the connector
    never asks an unlisted producer: one warning, and the request computes its prompt."""
    from tessellm.core.engine_core import EngineCoreRequest

    model = tiny_model_dir("llama")
    prompts = _prompts(2, seed=3)
    want = _plain(model, prompts)
    port = _free_port()
    with _llm(model, _peer("kv_producer", kv_port=port)) as p1:
        params = [_greedy(p1, p, 1, PREFILL).kv_transfer_params for p in prompts]
        for kv in ({}, {"kv_peer": f"127.0.0.1:{port + 1}"},
                   {"allowed_producers": ["10.9.9.9", f"127.0.0.1:{port + 1}"]}):
            with _llm(model, _peer("kv_consumer", **kv)) as c:
                with pytest.raises(ValueError, match=f"names the KV producer 127.0.0.1:{port}, which "
                                   "this engine does not fetch from") as exc:
                    _greedy(c, prompts[0], params=params[0])
                assert "allowed_producers" in str(exc.value) and '["*"]' in str(exc.value)
                assert getattr(exc.value, "param", None) == "kv_transfer_params"
                assert c.engine.core.info.kv_producers == sorted(kv.get("allowed_producers", []) + (
                    [kv["kv_peer"]] if "kv_peer" in kv else []))
                out = _greedy(c, prompts[1])  # the engine serves on
                assert list(out.outputs[0].token_ids) == want[1]
            if kv:
                continue
            with _llm(model, _peer("kv_consumer")) as c:  # past the edge: not asked
                core = c.engine.core
                core.add_request(EngineCoreRequest("direct", prompts[0], SamplingParams(
                    temperature=0, max_tokens=6, ignore_eos=True, kv_transfer_params=params[0]), 0.0))
                tokens = []
                while core.has_unfinished_requests():
                    tokens += [t for o in core.step() if o.request_id == "direct" for t in o.new_token_ids]
                assert tokens == want[0]
                stats = core.scheduler.stats().kv_connector
                assert (stats["remote_prefill_fallbacks"], stats["hits"], stats["store_down"]) == (1, 0, 0)
            assert caplog.text.count(f"KV producer 127.0.0.1:{port} named by") == 1
        for allowed in (["127.0.0.1"], [f"127.0.0.1:{port}"], ["*"]):
            with _llm(model, _peer("kv_consumer", allowed_producers=allowed)) as c:
                out = _greedy(c, prompts[0], params=params[0])
                assert (list(out.outputs[0].token_ids), out.num_cached_tokens) == (want[0], 40)
                assert c.engine.core.info.kv_producers == (None if allowed == ["*"] else allowed)


@pytest.mark.parametrize("value", ["10.0.0.5", ["10.0.0.5", ""], [5], ["10.0.0.5 :1"]])
def test_a_malformed_allowed_producers_is_one_error(value):
    from tessellm.kv_transfer import (KVConnectorContext, KVConnectorRole, make_connector,
                                      parse_kv_transfer_config)

    kv = parse_kv_transfer_config(_peer("kv_consumer", allowed_producers=value))
    with pytest.raises(ValueError, match="allowed_producers is the producers a request"):
        make_connector(kv, KVConnectorRole.SCHEDULER, KVConnectorContext(BS, "ns"))


def test_a_thread_keeps_a_few_producer_sockets_at_most():
    """xPyD producers come and go: a thread's sockets to the producers it talked to are kept
    up to ``per_thread``, the least recently used closed past that (a kept socket to a gone
    producer would reconnect forever); a producer asked again after its socket went gets a
    new one and answers."""
    import zmq

    from tessellm.kv_transfer.zmq_peer import BlockServer, BlockStore, _Clients

    server_zmq = zmq.Context()
    ports = [_free_port() for _ in range(3)]
    servers = [BlockServer(BlockStore(capacity=1 << 10), "ns", "127.0.0.1", p, server_zmq) for p in ports]
    clients = _Clients(per_thread=2)
    try:
        for p in ports + ports[:1]:
            assert clients.request(f"127.0.0.1:{p}", [b"has", b"ns"], 5.0) == [b"ok", b"0"]
            assert len(clients._open) <= 2
        assert list(clients._local.socks) == [f"127.0.0.1:{ports[2]}", f"127.0.0.1:{ports[0]}"]
    finally:
        clients.close()
        for server in servers:
            server.close()
        server_zmq.term()


def test_a_producer_address_zeromq_cannot_read_is_marked_down_not_hung(caplog):
    """A request naming a remote_host ZeroMQ refuses (``bad_host!``) costs its lookup a miss
    and marks that producer down alone; no socket of it is kept, so a later lookup asks
    nothing and the connector's shutdown returns (a kept unconnected socket would block a send
    forever, and the ZeroMQ context's end with it)."""
    import threading
    from types import SimpleNamespace

    from tessellm.kv_transfer import (KVConnectorContext, KVConnectorRole, make_connector,
                                      parse_kv_transfer_config)

    kv = parse_kv_transfer_config(_peer("kv_consumer", lookup_timeout_ms=2000, allowed_producers=["*"]))
    conn = make_connector(kv, KVConnectorRole.SCHEDULER, KVConnectorContext(BS, "ns"))
    params = {"do_remote_prefill": True, "remote_host": "bad_host!", "remote_port": 1}
    SamplingParams(kv_transfer_params=params)  # (the checks at the edge let it through)
    req = SimpleNamespace(request_id="r", all_token_ids=list(range(3, 24)), num_tokens=21,
                          lora_request=None, block_key=lambda a, b, lora: None,
                          sampling_params=SimpleNamespace(kv_transfer_params=params))
    try:
        assert conn.get_num_new_matched_tokens(req, 0)[0] == 0
        assert conn._address(0, "bad_host!:1") is None  # marked down
        assert "KV peer bad_host!:1: a lookup failed: cannot connect" in caplog.text
        assert not conn.health.down() and conn.stats.store_down == 0
    finally:
        closing = threading.Thread(target=conn.shutdown, daemon=True)
        closing.start()
        closing.join(10)
    assert not closing.is_alive(), "the connector's shutdown hung"


def test_the_producers_held_down_are_bounded():
    """A producer that did not answer is not asked for store_down_ms; the addresses held down
    expire (each mark drops the expired ones) and never number more than max_entries, however
    many distinct producers requests name and fail on."""
    from tessellm.kv_transfer import (KVConnectorContext, KVConnectorRole, make_connector,
                                      parse_kv_transfer_config)
    from tessellm.kv_transfer.peer_backoff import PeerBackoff

    clock = [100.0]
    down = PeerBackoff(5.0, max_entries=4, clock=lambda: clock[0])
    for i in range(10):
        down.mark(f"10.0.0.{i}:1")
    assert len(down) == 4  # the six oldest dropped: asked again a little early
    assert [down.down(f"10.0.0.{i}:1") for i in (0, 5, 6, 9)] == [False, False, True, True]
    down.mark("10.0.0.6:1")  # marked again: now the newest
    clock[0] += 4.0
    down.mark("10.0.0.10:1")
    assert len(down) == 5 - 1 and down.down("10.0.0.9:1")  # none expired yet (4 past the cap)
    clock[0] += 1.0  # 5 s after the first marks: they expire, the later ones stand
    down.mark("10.0.0.11:1")
    assert len(down) == 2 and not down.down("10.0.0.9:1") and down.down("10.0.0.10:1")
    down.clear("10.0.0.10:1")  # it answered
    assert not down.down("10.0.0.10:1") and len(down) == 1

    kv = parse_kv_transfer_config(_peer("kv_consumer", allowed_producers=["*"], store_down_ms=60_000))
    conn = make_connector(kv, KVConnectorRole.SCHEDULER, KVConnectorContext(BS, "ns", 2))
    try:
        for port in range(1, 3001):  # 3000 producers (two ranks each), none answering
            conn._mark_down("gone", f"10.1.{port // 250}.{port % 250}:{port}")
        assert len(conn._down) == 1024
        assert conn._address(0, "10.1.12.0:3000") is None  # the latest still held down
        assert conn._address(1, "10.1.0.1:1") == "10.1.0.1:2"  # the oldest dropped: asked again
    finally:
        conn.shutdown()


def test_a_routed_producer_that_dies_mid_transfer_is_a_recompute_and_leaves_nothing_open(
        tiny_model_dir, caplog):
    """xPyD with a producer dying: a consumer without kv_peer finds p's blocks at the producer
    p's params name, then that producer's server stops (gone mid-transfer). p's load waits
    ``timeout_s`` (0.5 s) for its reply and fails: p computes its prompt (a plain engine's
    tokens), counted once as a load failure and as a fallback, and the reader's socket to the
    gone producer is closed (its replies were due). q, routed there next, is computed too
    (counted): its lookup, on the scheduler's side, times out once (each half holds the
    producer down on its own failures: the workers run in other processes), and s after it is
    not asked at all. In a consumer whose loads wait 2 s, r, aborted while its load waits for
    the gone producer, keeps its blocks until that load's bound (a reader may still write
    them) and no longer: then they are free, no routing state or socket is left behind, and
    the engine shuts down in bound."""
    from tests.core.test_kv_transfer_failures import _drive, _step_until_looked_up

    model = tiny_model_dir("llama")
    p, q, r, s_ = _prompts(4, seed=5)
    want = _plain(model, [p, q, s_])
    port = _free_port()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def routed_params(rparams) -> SamplingParams:
        return params.clone(kv_transfer_params=rparams)

    with _llm(model, _peer("kv_producer", kv_port=port)) as producer:
        routed = {x: _greedy(producer, prompt, 1, PREFILL).kv_transfer_params
                  for x, prompt in (("p", p), ("q", q), ("r", r), ("s", s_))}
        conn = producer.engine.core.runner.kv_connector
        consumer = _llm(model, _peer("kv_consumer", allowed_producers=["127.0.0.1"], timeout_s=0.5,
                                     lookup_wait_ms=0, load_async=True))
        waiting = _llm(model, _peer("kv_consumer", allowed_producers=["127.0.0.1"], timeout_s=2,
                                    lookup_wait_ms=0, lookup_timeout_ms=20000, load_async=True))
        try:
            for llm, rid, prompt in ((consumer, "p", p), (waiting, "r", r)):
                llm.engine.add_request(rid, {"prompt_token_ids": prompt}, routed_params(routed[rid]))
                _step_until_looked_up(llm.engine, llm.engine.core.scheduler, rid)
            conn._server.close()  # the producer is gone: nothing answers the loads' "get"
            conn._server = None
            engine, sched = consumer.engine, consumer.engine.core.scheduler
            outs = _drive(engine, 20)
            engine.add_request("q", {"prompt_token_ids": q}, routed_params(routed["q"]))
            outs.update(_drive(engine, 20))
            told = caplog.text.count(f"KV peer 127.0.0.1:{port} did not answer")
            engine.add_request("s", {"prompt_token_ids": s_}, routed_params(routed["s"]))
            outs.update(_drive(engine, 20))
            assert caplog.text.count(f"KV peer 127.0.0.1:{port} did not answer") == told  # not asked
            assert {k: list(o.outputs[0].token_ids) for k, o in outs.items()} == {
                "p": want[0], "q": want[1], "s": want[2]}
            assert [outs[k].num_cached_tokens for k in "pqs"] == [0, 0, 0]
            stats = sched.stats().kv_connector
            assert (stats["load_failures"], stats["remote_prefill_fallbacks"], stats["hits"]) == (1, 3, 0)
            assert sched.kv.num_free_blocks == 32 and not sched.connector._routes
            assert not consumer.engine.core.runner.kv_connector._zmq._open  # the reader's socket: closed

            engine, sched = waiting.engine, waiting.engine.core.scheduler
            for _ in range(3):
                engine.step()
            assert "r" in sched.kv_loading  # its "get" waits for the gone producer
            engine.abort_request("r")
            engine.step()
            assert sched.kv.num_free_blocks < 32  # held while a reader may write them
            _drive(engine, 20)  # the load's bound: timeout_s, then its failure
            assert sched.kv.num_free_blocks == 32 and not sched.kv_loading
            assert not sched.connector._routes and not sched.connector._lookups
            assert not waiting.engine.core.runner.kv_connector._zmq._open
            t0 = time.monotonic()
            waiting.shutdown()
            assert time.monotonic() - t0 < 5
        finally:
            consumer.shutdown()
            waiting.shutdown()


def _ipv6_loopback() -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback (::1)")


def test_addresses_ipv6_in_brackets_and_host_names_case_blind():
    """``host:port`` splits at the last colon only outside brackets: ``[v6]:port`` reads, a
    bare IPv6 address with a port is refused as ambiguous (one error naming the fix);
    allowed_producers entries and a request's producer compare host names case-blind and
    IPv6 addresses in their short form."""
    from tessellm.kv_transfer import (KVConnectorContext, KVConnectorRole, make_connector,
                                      parse_kv_transfer_config)
    from tessellm.kv_transfer.address import split_host_port
    from tessellm.kv_transfer.params import check_producer, remote_producer

    assert split_host_port("[FE80:0::1]:14579", "kv_peer") == ("fe80::1", 14579)
    assert split_host_port("Node-A:14579", "kv_peer") == ("node-a", 14579)
    for bad in ("fe80::1:14579", "::1"):
        with pytest.raises(ValueError, match=r"kv_peer '.*' is ambiguous: .*in brackets, '\[ADDRESS\]:PORT'"):
            split_host_port(bad, "kv_peer")
    with pytest.raises(ValueError, match=r"remote_host .*IPv6 address bare or in brackets"):
        SamplingParams(kv_transfer_params={"do_remote_prefill": True, "remote_host": "[not-v6]", "remote_port": 1})

    def consumer(**extra):
        kv = parse_kv_transfer_config(_peer("kv_consumer", **extra))
        return make_connector(kv, KVConnectorRole.SCHEDULER, KVConnectorContext(BS, "ns"))

    for extra in ({"kv_peer": "::1:14579"}, {"allowed_producers": ["fe80::1"]}):
        with pytest.raises(ValueError, match="is ambiguous: a bare IPv6 address"):
            consumer(**extra)
    conn = consumer(allowed_producers=["Node-A", "[FE80::1]:14579", "[::1]"], kv_peer="[::1]:7")
    try:
        assert conn.allowed_producers() == ["[::1]", "[::1]:7", "[fe80::1]:14579", "node-a"]
        allowed = conn.allowed_producers()
        for host, port in (("NODE-A", 9), ("fe80:0:0::1", 14579), ("[::1]", 5), ("::1", 6)):
            where = remote_producer({"do_remote_prefill": True, "remote_host": host, "remote_port": port})
            check_producer({"do_remote_prefill": True, "remote_host": host, "remote_port": port}, allowed)
            assert conn._rank_address(1, where) == where[:where.rindex(":") + 1] + str(port + 1)
        with pytest.raises(ValueError, match=r"names the KV producer \[fe80::1\]:1, which"):
            check_producer({"do_remote_prefill": True, "remote_host": "fe80::1", "remote_port": 1}, allowed)
    finally:
        conn.shutdown()


def test_a_producer_port_whose_top_rank_is_past_65535_is_refused_at_configuration():
    """Rank r listens on (and is fetched from) its rank 0 port + r: a kv_port, kv_peer or
    allowed_producers port that puts the top rank past 65535 is one error naming the setting
    and the highest port that fits; the highest that fits is taken. A request naming such a
    producer (its port is checked only against 1-65535) has no producer for those ranks."""
    from tessellm.kv_transfer import KVConnectorContext, KVConnectorRole, make_connector, parse_kv_transfer_config

    def connector(role, world_size, **extra):
        kv = parse_kv_transfer_config(_peer(role, **extra))
        return make_connector(kv, KVConnectorRole.SCHEDULER, KVConnectorContext(BS, "ns", world_size=world_size))

    for role, extra, match in (
            ("kv_producer", {"kv_port": 65535}, r"kv_port is the TCP port .*1 to 65534 for its 2 rank"),
            ("kv_consumer", {"kv_peer": "node-a:65535"},
             r"kv_peer 'node-a:65535' puts the producer's rank 1 on port 65536, past 65535 .*1 to 65534 for 2"),
            ("kv_consumer", {"allowed_producers": ["node-b", "[fe80::1]:65535"]},
             r"allowed_producers entry '\[fe80::1\]:65535' puts the producer's rank 1 on port 65536")):
        with pytest.raises(ValueError, match=match):
            connector(role, 2, **extra)
    for world_size, port in ((1, 65535), (2, 65534)):
        conn = connector("kv_consumer", world_size, kv_port=port, kv_peer=f"node-a:{port}",
                         allowed_producers=[f"node-b:{port}"])
        try:
            assert conn._rank_address(world_size - 1) == "node-a:65535"
            assert conn._rank_address(world_size, "node-c:65535") is None
        finally:
            conn.shutdown()


@pytest.mark.parametrize("address", ["node-a:\u00b2", "[::1]:\u0661\u0664", "node-a:", "node-a:0",
                                     "node-a:65536", "node-a: 7"])
def test_a_port_that_is_not_1_to_65535_in_ascii_digits_is_the_one_error(address):
    """A port of Unicode digits (which str.isdigit takes and int() refuses or reads) is the same
    error as any other bad port, naming the form."""
    from tessellm.kv_transfer.address import split_host_port

    with pytest.raises(ValueError, match=r"kv_peer must be 'host:port' with a port 1-65535"):
        split_host_port(address, "kv_peer")


def test_a_producer_on_ipv6_loopback_serves_its_consumer(tiny_model_dir):
    """A producer listening on ``::1`` (kv_bind) hands back remote_host ``::1``; a consumer
    allowed ``[::1]`` connects to ``[::1]:port`` (ZeroMQ with IPv6 on) and loads the prompt's
    blocks: a plain engine's greedy tokens, 40 tokens cached."""
    _ipv6_loopback()
    model = tiny_model_dir("llama")
    prompt = _prompts(1, seed=5)[0]
    want = _plain(model, [prompt])[0]
    port = _free_port()
    with _llm(model, _peer("kv_producer", kv_port=port, kv_bind="::1")) as producer, \
            _llm(model, _peer("kv_consumer", timeout_s=5.0, allowed_producers=["[::1]"])) as consumer:
        params = _greedy(producer, prompt, 1, PREFILL).kv_transfer_params
        assert (params["remote_host"], params["remote_port"]) == ("::1", port)
        out = _greedy(consumer, prompt, params=params)
        assert (list(out.outputs[0].token_ids), out.num_cached_tokens) == (want, 40)


def test_a_wildcard_kv_bind_hands_back_an_address_of_its_family():
    """Without kv_host a producer bound to every interface hands back (remote_host) this host's
    outward address in the bind's family: IPv4 for ``0.0.0.0``, IPv6 for ``[::]`` (its peers
    reach it over IPv6; it handed out the IPv4 one before), an address this host holds (a
    socket binds to it). On a host with no global IPv6 route ``[::]`` is the one error naming
    kv_host; a kv_host given is handed back as it is."""
    import ipaddress
    import socket

    from tessellm.kv_transfer import KVConnectorContext, KVConnectorRole, make_connector, parse_kv_transfer_config

    def host(**extra) -> str:
        kv = parse_kv_transfer_config(_peer("kv_producer", **extra))
        conn = make_connector(kv, KVConnectorRole.SCHEDULER, KVConnectorContext(BS, "ns"))
        conn.shutdown()
        return conn.host

    v4 = host(kv_bind="0.0.0.0")
    assert ":" not in v4
    assert host(kv_bind="[::]", kv_host="[2001:DB8::5]") == "2001:db8::5"
    try:
        v6 = host(kv_bind="[::]")
    except ValueError as exc:  # no IPv6 route here: say what to set
        assert "set kv_host to the address they reach this producer at" in str(exc)
        return
    address = ipaddress.IPv6Address(v6)
    assert not (address.is_link_local or address.is_unspecified or address.is_loopback), v6
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind((v6, 0))  # this host's own
    assert host(kv_bind="0::0") == v6  # any spelling of the wildcard
