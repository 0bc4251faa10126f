"""The Ray Serve router on the replicas' engine load (router.balance, replica_load.py), without a
cluster: Serve's own router objects (RunningReplica, PendingRequest, the queue-length cache)
around the real PrefixAffinityRouter, fed load reports made from a real engine core's
scheduler (core_load, as a replica's ``record_routing_stats`` reports it)."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from ray.serve._private.common import (DeploymentHandleSource, DeploymentID, ReplicaID,
                                       RequestMetadata, RunningReplicaInfo)
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica

from tessellm import SamplingParams
from tessellm.config import EngineArgs
from tessellm.core.engine_core import EngineCore, EngineCoreRequest
from tessellm.core.load_report import core_load, waiting_kv_blocks
from tessellm.entrypoints.ray_serve.app import engine_options
from tessellm.entrypoints.ray_serve.config import parse_config
from tessellm.entrypoints.ray_serve.prefix_router import PrefixAffinityRouter
from tessellm.entrypoints.ray_serve.replica_load import load_report, replica_score, threshold

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic use

DEPLOYMENT = DeploymentID(name="TessellmEngine", app_name="tessellm")
CHAIN = [101, 102, 103]  # a prompt's prefix chain (three chunks: ~96 tokens)
_ids = itertools.count()


@pytest.fixture(scope="module")
def reports(tiny_model_dir):
    """Load reports of one real engine core (max_num_seqs=2) in three states: idle; one request
    running; four requests, two running and two waiting behind the full batch."""
    args = EngineArgs(model=tiny_model_dir("llama"), device="cpu", dtype="float32", num_kv_blocks=64,
                      max_model_len=128, max_num_seqs=2)
    core = EngineCore(args)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)

    def report(received: int) -> dict:
        stats = {"num_running": len(core.scheduler.running), "num_waiting": len(core.scheduler.waiting),
                 "load": core_load(core.scheduler, received)}  # the core's stats call answers these
        return load_report(stats, in_flight=received, block_size=args.block_size)

    out = {"idle": report(0)}
    core.add_request(EngineCoreRequest("r0", list(range(3, 23)), params, 0.0))
    core.step()
    out["one"] = report(1)
    for i in range(1, 4):
        core.add_request(EngineCoreRequest(f"r{i}", list(range(3 + i, 23 + i)), params, 0.0))
    core.step()
    out["queued"] = report(4)
    return out


class _ReplicaInfo(RunningReplicaInfo):
    """Serve's replica record, for a replica with no actor behind it (the router never calls it;
    Serve's RunningReplica looks the actor up when built)."""

    def get_actor_handle(self):
        return None


def _replica(uid: str, report: dict) -> RunningReplica:
    return RunningReplica(_ReplicaInfo(
        replica_id=ReplicaID(unique_id=uid, deployment_id=DEPLOYMENT), node_id=None, node_ip=None,
        availability_zone=None, actor_name=uid, max_ongoing_requests=256, routing_stats=report))


def _router(**kwargs) -> PrefixAffinityRouter:
    router = PrefixAffinityRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN,
                                  use_replica_queue_len_cache=True)
    router.initialize_state(**kwargs)
    return router


def _route(router: PrefixAffinityRouter, replicas: list, chain=CHAIN, samples: int = 1) -> str:
    """Route one request as Serve does (choose, send, routed); the first choice's unique id."""
    async def go():
        pending = PendingRequest(args=[], kwargs={"prefix_hashes": list(chain), "num_samples": samples},
                                 metadata=RequestMetadata(request_id="x", internal_request_id=f"q{next(_ids)}"))
        ranks = await router.choose_replicas(replicas, pending)
        chosen = ranks[0][0]
        router.on_send_request(chosen.replica_id)
        router.on_request_routed(pending, chosen.replica_id, None)
        return chosen.replica_id.unique_id

    return asyncio.run(go())


def test_the_engine_reports_what_the_score_reads(reports):
    """The core's figures behind each report, and their scores (4 x queued + running + 1 if it
    starts at once, else + 4; replica_load.py): the full batch with two waiting scores 14."""
    one, queued = reports["one"], reports["queued"]
    assert (one["load"]["running"], one["load"]["waiting"], one["load"]["free_seqs"]) == (1, 0, 1)
    assert (queued["load"]["running"], queued["load"]["waiting"], queued["load"]["free_seqs"]) == (2, 2, 0)
    assert queued["in_flight"] == 4 and queued["block_size"] == 16
    assert replica_score(reports["idle"], 0, 96) == 1
    assert replica_score(one, 1, 96) == 1 + 1
    assert replica_score(queued, 4, 96) == 4 * 2 + 2 + 4
    assert replica_score({}, 0, 96) == 1  # no report yet, nothing sent there: idle
    assert replica_score({}, 3, 96) == 3 + 1  # ... three requests there now: running
    # Since the report, one more request arrived (it takes the free slot: 2 running, none
    # free), two more (the second queues), or one left (a waiting one takes its slot).
    assert replica_score(one, 2, 96) == 2 + 4
    assert replica_score(one, 3, 96) == 4 * 1 + 2 + 4
    assert replica_score(queued, 3, 96) == 4 * 1 + 2 + 4
    # Waiting with slots and KV blocks free (held back by a step's token budget): about to run.
    budget = {**one, "load": {**one["load"], "waiting": 2, "free_seqs": 5, "free_blocks": 60}}
    assert replica_score(budget, 3, 96) == 3 + 1
    kv_full = {**one, "load": {**one["load"], "waiting": 2, "free_seqs": 5, "free_blocks": 3}}
    assert replica_score(kv_full, 3, 96) == 4 * 2 + 1 + 4  # 96 tokens need 6 blocks: a queue
    # An engine whose KV cache cannot hold the prompt would queue it.
    assert replica_score(reports["idle"], 0, 64 * 16 + 1) == 4


def test_a_prefix_holder_with_a_queue_loses_to_an_idle_replica(reports):
    """The holder of a prompt's prefix runs a full batch with two requests waiting (score 14); the
    other replica is idle (1): past the threshold (8), the request goes to the idle one. The
    in_flight figure (the router before load reports) sees 4 requests against 0, within its
    threshold, and keeps the request on the holder, behind the queue."""
    for balance, expected in (("load", "b"), ("in_flight", "a")):
        router = _router(balance=balance)
        a, b = _replica("a", reports["queued"]), _replica("b", reports["idle"])
        router._index.record("a", CHAIN)
        router.replica_queue_len_cache.update(a.replica_id, 4)  # Serve's view: 4 ongoing there
        router.replica_queue_len_cache.update(b.replica_id, 0)
        assert _route(router, [a, b]) == expected, balance


def test_a_lightly_loaded_holder_keeps_its_prefix(reports):
    """One request running, slots and blocks free (score 2 against 1): within the threshold, the
    prefix's replica wins; the threshold is the larger of 8 and an eighth of the least score."""
    router = _router(balance="load")
    a, b = _replica("a", reports["one"]), _replica("b", reports["idle"])
    router._index.record("a", CHAIN)
    assert _route(router, [a, b]) == "a"
    assert threshold(8, 1, "load") == 8 and threshold(8, 200, "load") == 25
    assert threshold(8, 200, "in_flight") == 8


def test_requests_since_the_report_fill_its_free_slots_then_queue(reports):
    """Both replicas last reported idle (two free slots each); what reached one since (Serve's
    queue-length cache, or this router's own count) runs there while slots are free and queues
    after. A burst with one prefix stays on its replica while it has slots (a burst of short
    requests does not spread for nothing) and spills once a request would queue there past the
    threshold, instead of piling onto it until the next report."""
    router = _router(balance="load")
    a, b = _replica("a", reports["idle"]), _replica("b", reports["idle"])
    router._index.record("a", CHAIN)
    picks = [_route(router, [a, b]) for _ in range(4)]
    # a scores 1, then 1 + 1 (one running, a slot free), 2 + 4 (none free), then 4 x 1 queued
    # + 2 + 4 = 10, more than 8 above b's 1: the fourth goes to b.
    assert picks == ["a", "a", "a", "b"], picks
    # A newer report replaces the estimate: a's engine runs two; the third, in the replica's
    # front end still (in flight, not in the engine), queues there. b runs its one.
    a = _replica("a", {**reports["idle"], "load": {**reports["idle"]["load"], "running": 2,
                                                     "free_seqs": 0}, "in_flight": 3})
    assert router.replica_loads([a, b], 96) == {"a": 4 * 1 + 2 + 4, "b": 1 + 1}


def test_a_burst_chosen_before_any_send_spreads_as_one_sent_in_turn(reports):
    """Serve routes concurrent requests in tasks of their own: all of a burst may be chosen
    before any of it is sent and counted in the queue-length cache. The router counts its own
    choices (until the send), so the burst lands as the sequential one above; then the sends
    replace the claims, counting each request once."""
    router = _router(balance="load")
    a, b = _replica("a", reports["idle"]), _replica("b", reports["idle"])
    router._index.record("a", CHAIN)

    async def choose_all(n):
        pending = [PendingRequest(args=[], kwargs={"prefix_hashes": CHAIN}, metadata=RequestMetadata(
            request_id="x", internal_request_id=f"c{next(_ids)}")) for _ in range(n)]
        return [(await router.choose_replicas([a, b], p))[0][0] for p in pending]

    chosen = asyncio.run(choose_all(4))
    assert [r.replica_id.unique_id for r in chosen] == ["a", "a", "a", "b"]
    for replica in chosen:
        router.on_send_request(replica.replica_id)
    assert router.replica_loads([a, b], 96) == {"a": 4 * 1 + 2 + 4, "b": 1 + 1}


def _pending(chain=CHAIN) -> PendingRequest:
    """A pending request as Serve makes it (call inside the event loop: it holds a future)."""
    return PendingRequest(args=[], kwargs={"prefix_hashes": list(chain)}, metadata=RequestMetadata(
        request_id="x", internal_request_id=f"p{next(_ids)}"))


def test_a_probe_answer_below_the_sends_in_transit_loses_none_of_them(reports):
    """Serve resets its queue-length cache to a replica's own count when a probe or a rejection
    answers, and misses the requests still on their way there (CI: a burst of six all landed on
    the holder after such a reset). The router's own count of what it sent there and has not
    seen complete is the floor: four sent, a probe answering 1, still four (two running in its
    two slots, two queued); completions take them off, and a cache above the floor (other
    routers' requests) wins."""
    router = _router(balance="load")
    a, b = _replica("a", reports["idle"]), _replica("b", reports["idle"])

    async def send_all():
        pending = [_pending() for _ in range(4)]
        for p in pending:
            await router.choose_replicas([a], p)
            p.future.set_result(a)
            router.on_send_request(a.replica_id)
        return pending

    pending = asyncio.run(send_all())
    router.on_new_queue_len_info(a.replica_id, 1)  # the replica had received one of them
    assert router.replica_loads([a, b], 96)["a"] == 4 * 2 + 2 + 4
    for p in pending[:3]:
        router.on_request_completed(a.replica_id, p.metadata.internal_request_id)
        router.decrement_queue_len_cache(a.replica_id)
    assert router._sent == {"a": 1} and router.replica_loads([a, b], 96)["a"] == 1 + 1
    router.on_new_queue_len_info(a.replica_id, 3)  # two more from another ingress replica
    assert router.replica_loads([a, b], 96)["a"] == 4 * 1 + 2 + 4


def test_a_claim_lasts_until_its_send_however_late(reports, monkeypatch):
    """On a busy machine a request may be sent seconds after it was chosen; its claim still
    counts then, at the replica Serve fulfilled it with (another rank's when the chosen one was
    full), and the send there replaces it. A cancelled request's claim ends at once."""
    import tessellm.entrypoints.ray_serve.prefix_router as prefix_router

    clock = [100.0]
    monkeypatch.setattr(prefix_router.time, "monotonic", lambda: clock[0])
    router = _router(balance="load")
    a, b = _replica("a", reports["idle"]), _replica("b", reports["idle"])
    router._index.record("a", CHAIN)

    async def go():
        first, moved, cancelled = _pending(), _pending(), _pending()
        for p in (first, moved, cancelled):
            assert (await router.choose_replicas([a, b], p))[0][0] is a
        clock[0] += 10.0  # long past the old one-second claim
        assert router.replica_loads([a, b], 96) == {"a": 4 * 1 + 2 + 4, "b": 1}  # two slots
        moved.future.set_result(b)  # Serve took the second rank for it
        cancelled.future.cancel()
        assert router.replica_loads([a, b], 96) == {"a": 1 + 1, "b": 1 + 1}
        router.on_send_request(b.replica_id)
        assert router._routed == {(moved.metadata.internal_request_id, "b"): 1}
        first.future.set_result(a)
        router.on_send_request(a.replica_id)
        assert router._claims == {} and router._sent == {"a": 1, "b": 1}
        assert router.replica_loads([a, b], 96) == {"a": 1 + 1, "b": 1 + 1}
        # A retry of a request re-claims: its earlier choice does not count against a replica.
        retry = _pending()
        await router.choose_replicas([a, b], retry)
        await router.choose_replicas([a, b], retry)
        assert len(router._claims) == 1

    asyncio.run(go())


@pytest.mark.parametrize("late", ["before the retry's send", "after it", "after the retry's end"])
def test_a_rejected_send_retried_elsewhere_counts_at_each_until_its_own_completion(reports, late):
    """Serve 2.60 sends with its rejection protocol (strict max_ongoing_requests, the default): a
    replica that is full rejects the request, Serve cancels that send and routes the request
    again under the same internal id. The cancelled send's completion is an RPC away and may
    come after the retry's send, or its end; it ends the count at the replica that rejected it,
    not the retry's (the retry's own completion ends that one), and leaves the retry's claim."""
    router = _router(balance="load")
    a, b = _replica("a", reports["idle"]), _replica("b", reports["idle"])
    p = []

    def rejected_send_ends():
        router.on_request_completed(a.replica_id, p[0].metadata.internal_request_id)

    async def go():
        p.append(_pending([]))
        await router.choose_replicas([a, b], p[0])
        p[0].future.set_result(a)
        router.on_send_request(a.replica_id)
        router.on_new_queue_len_info(a.replica_id, 256)  # rejected: a was full
        p[0].reset_future()  # Serve's retry
        await router.choose_replicas([a, b], p[0])
        if late == "before the retry's send":
            rejected_send_ends()
            assert len(router._claims) == 1 and router._sent == {}  # the retry's claim stands
        p[0].future.set_result(b)
        router.on_send_request(b.replica_id)

    asyncio.run(go())
    if late == "after it":
        rejected_send_ends()
    assert router._sent == ({"a": 1, "b": 1} if late == "after the retry's end" else {"b": 1})
    router.on_request_completed(b.replica_id, p[0].metadata.internal_request_id)
    if late == "after the retry's end":
        assert router._sent == {"a": 1}
        rejected_send_ends()
    assert router._sent == {} and router._routed == {} and router._unnamed == {} and router._claims == {}


@pytest.mark.parametrize("balance", ["load", "in_flight"])
def test_a_failed_send_ends_its_claim_and_no_other_count(reports, balance):
    """A send that raised (Serve calls on_request_completed for it, with no send before) ends
    its claim and leaves the counts of the requests sent there alone. With ``balance:
    in_flight`` the choices are not load, but they still name the sends."""
    router = _router(balance=balance)
    a = _replica("a", reports["idle"])

    async def go():
        sent, failed = _pending([]), _pending([])
        for p in (sent, failed):
            await router.choose_replicas([a], p)
            p.future.set_result(a)
        if balance == "in_flight":
            assert router.replica_loads([a], 96) == {"a": 0}  # chosen, not counted
        router.on_send_request(a.replica_id)
        router.on_request_completed(a.replica_id, failed.metadata.internal_request_id)  # its send raised
        assert router._sent == {"a": 1} and router._claims == {}
        if balance == "in_flight":
            assert router.replica_loads([a], 96) == {"a": 1}
        router.on_request_completed(a.replica_id, sent.metadata.internal_request_id)
        assert router._sent == {} and router._routed == {}

    asyncio.run(go())


def test_router_drops_the_counts_of_gone_replicas(reports):
    """A killed replica's requests may never complete; its counts, claims and routes must not
    outlive it, and a late completion from it is ignored."""
    router = _router(balance="load")
    a, b, c = (_replica(uid, reports["idle"]) for uid in "abc")

    async def go():
        pending = [_pending([]) for _ in range(4)]
        for p, replica in zip(pending, (a, a, b, a)):
            await router.choose_replicas([a, b], p)
            p.future.set_result(replica)  # where Serve sends it, whichever was chosen
            if p is not pending[3]:  # the last one stays unsent
                router.on_send_request(replica.replica_id)
        assert router._sent == {"a": 2, "b": 1} and len(router._claims) == 1
        await router.choose_replicas([b, c], _pending([]))  # a is gone
        assert router._sent == {"b": 1} and len(router._routed) == 1
        assert all(claim.uid != "a" for claim in router._claims.values())
        return pending

    pending = asyncio.run(go())
    router.on_request_completed(a.replica_id, pending[0].metadata.internal_request_id)  # late: ignored
    router.on_request_completed(b.replica_id, pending[2].metadata.internal_request_id)
    assert router._sent == {} and router._routed == {}


def test_balance_is_a_documented_option_with_a_default():
    cfg = parse_config({"engine": {"device": "cpu"}})
    assert cfg.router.balance == "load" and cfg.router.load_report_period_s == 1.0
    opts = engine_options(cfg)["request_router_config"]
    assert opts.request_router_kwargs["balance"] == "load"
    assert opts.request_routing_stats_period_s == 1.0
    old = engine_options(parse_config({"engine.device": "cpu", "router.balance": "in_flight"}))
    assert old["request_router_config"].request_router_kwargs["balance"] == "in_flight"
    with pytest.raises(ValueError, match="router.balance 'queue' is not supported"):
        parse_config({"engine": {"device": "cpu"}, "router": {"balance": "queue"}})
    with pytest.raises(ValueError, match="load_report_period_s must be > 0"):
        parse_config({"engine": {"device": "cpu"}, "router": {"load_report_period_s": 0}})
    # A router built before the option existed (no balance keyword) keeps the old figure.
    assert _router()._balance == "in_flight"


def _core_report(core, in_flight: int, samples: int, block_size: int) -> dict:
    """The replica's report of ``core``, as record_routing_stats builds it from the core's stats
    call (``core_load`` with ``waiting_kv_blocks``)."""
    load = {**core_load(core.scheduler, in_flight), "waiting_blocks": waiting_kv_blocks(core.scheduler)}
    return load_report({"load": load}, in_flight, block_size, samples)


def test_a_request_with_n_samples_counts_each(tiny_model_dir):
    """A real core running one n = 4 request (four core requests, the later samples waiting for
    the first's prefill): the routers see one request there, the engine four sequences. The
    replica reports its requests' samples, so the score keeps all four (no free slot: the
    request routed next queues) instead of taking three for finished; and the request being
    routed counts each of its samples."""
    args = EngineArgs(model=tiny_model_dir("llama"), device="cpu", dtype="float32", num_kv_blocks=64,
                      max_model_len=128, max_num_seqs=4)
    core = EngineCore(args)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True, n=4)
    ids = [f"{i}_r" for i in range(4)]  # input_processor.make_requests' children
    for i, rid in enumerate(ids):
        core.add_request(EngineCoreRequest(rid, list(range(3, 40)), params.clone(n=1), 0.0,
                                           wait_for=ids[0] if i else None))
    core.step()
    core.step()
    report = _core_report(core, in_flight=1, samples=4, block_size=args.block_size)
    load = report["load"]
    assert load["running"] + load["waiting"] == 4 and report["in_flight_samples"] == 4
    assert replica_score(report, 1, 96) == 4 * load["waiting"] + load["running"] + 4  # queues
    as_requests = {**report, "in_flight_samples": 1}  # what counting requests alone would see
    assert replica_score(as_requests, 1, 96) < replica_score(report, 1, 96)
    # The request being routed: each sample counts and needs a slot.
    assert replica_score(reports_idle(args), 0, 96, num_samples=4) == 4
    two_slots = {"load": {"waiting": 0, "running": 2, "free_seqs": 2, "free_blocks": 60},
                 "in_flight": 2, "block_size": 16}
    assert replica_score(two_slots, 2, 96, num_samples=2) == 2 + 2
    assert replica_score(two_slots, 2, 96, num_samples=3) == 2 + 3 * 4  # one slot short: queued
    # 100 tokens: 6 full blocks shared, a tail block each: 6 + 3 fit in 9 blocks, not in 8.
    tight = {**two_slots, "load": {**two_slots["load"], "free_seqs": 3, "free_blocks": 9}}
    assert replica_score(tight, 2, 100, num_samples=3) == 2 + 3
    tight["load"]["free_blocks"] = 8
    assert replica_score(tight, 2, 100, num_samples=3) == 2 + 3 * 4


def reports_idle(args) -> dict:
    return load_report({"load": {"waiting": 0, "running": 0, "free_seqs": 4, "free_blocks": 60}}, 0,
                       args.block_size)


def test_waiting_requests_kv_counts_shared_prompt_blocks_once(tiny_model_dir):
    """A real core with one request running on a 64-token prefix and five waiting: three share
    that prefix (its 4 blocks are held: each needs only its tail block), two share another
    (the first needs all 5 blocks, the second its tail). The engine counts 3 + 5 + 1 = 9
    blocks, where the new prompt's size times five would be 25: with 11 free blocks all five
    start (6 running; the new prompt does not fit the 2 blocks left: 6 + 4), not two of them
    (a queue of three: 4 x 3 + 3 + 4)."""
    args = EngineArgs(model=tiny_model_dir("llama"), device="cpu", dtype="float32", num_kv_blocks=16,
                      max_model_len=128, max_num_seqs=8)
    core = EngineCore(args)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    prefix = [(11 * j) % 90 + 3 for j in range(64)]
    other = [(7 * j) % 90 + 3 for j in range(64)]
    core.add_request(EngineCoreRequest("r0", prefix + [1] * 8, params, 0.0))
    core.step()
    for i in range(3):
        core.add_request(EngineCoreRequest(f"a{i}", prefix + [i + 2] * 8, params, 0.0))
    for i in range(2):
        core.add_request(EngineCoreRequest(f"b{i}", other + [i + 2] * 8, params, 0.0))
    report = _core_report(core, in_flight=6, samples=6, block_size=args.block_size)
    load = report["load"]
    assert (load["running"], load["waiting"], load["waiting_blocks"], load["free_blocks"]) == (1, 5, 9, 11)
    assert replica_score(report, 6, 72) == 6 + 4
    naive = {**report, "load": {k: v for k, v in load.items() if k != "waiting_blocks"}}
    assert replica_score(naive, 6, 72) == 4 * 3 + 3 + 4


def test_the_router_counts_the_samples_of_the_request_it_routes(reports):
    """The holder of the prefix runs one request with a slot free (score 2 against the idle
    replica's 1): a single sample stays there; eight samples would queue seven behind its one
    slot (1 + 4 x 8 = 33 against 8), past the threshold: they go to the idle replica. The
    ingress reads the samples off the body (n, best_of, a batch of prompts)."""
    from tessellm.entrypoints.ray_serve.prefix_key import route_info

    for samples, expected in ((1, "a"), (8, "b")):
        router = _router(balance="load")
        a, b = _replica("a", reports["one"]), _replica("b", {**reports["idle"], "load": {
            **reports["idle"]["load"], "free_seqs": 8}})
        router._index.record("a", CHAIN)
        router.replica_queue_len_cache.update(a.replica_id, 1)
        router.replica_queue_len_cache.update(b.replica_id, 0)
        loads = router.replica_loads([a, b], 96, samples)
        assert loads == ({"a": 2, "b": 1} if samples == 1 else {"a": 1 + 4 * 8, "b": 8})
        assert _route(router, [a, b], samples=samples) == expected, samples
    body = lambda **kw: json.dumps({"model": "m", "prompt": "hi", **kw}).encode()  # noqa: E731
    info = lambda b: route_info("/v1/completions", b, 16, 4, 64)[2]  # noqa: E731
    assert info(body()) == 1 and info(body(n=4)) == 4 and info(body(n=2, best_of=3)) == 3
    assert info(body(prompt=["a", "b"], n=3)) == 6 and info(body(n="x")) == 1 and info(b"{bad") == 1


def test_a_replica_with_slower_steps_weighs_its_work_ahead_more(reports, monkeypatch):
    """Two replicas with two requests running each (the engine's own reports), one stepping at
    10 ms, the other at 40 ms: over the median (25 ms) their factors are 0.4 and 1.6, so their
    scores are 2 x 0.4 + 1 and 2 x 1.6 + 1; idle ones tie whatever their step times, and one
    with no step time yet counts as average."""
    monkeypatch.setenv("TESSELLM_BALANCE_BY_STEP_TIME", "1")  # opt-in
    def stepping(ms, running=2):
        load = {**reports["idle"]["load"], "running": running, "free_seqs": 8, "step_ms": ms}
        return {**reports["idle"], "load": load, "in_flight": running, "in_flight_samples": running}

    router = _router(balance="load")
    a, b = _replica("a", stepping(10.0)), _replica("b", stepping(40.0))
    for replica in (a, b):
        router.replica_queue_len_cache.update(replica.replica_id, 2)
    assert router.replica_loads([a, b], 96) == pytest.approx({"a": 2 * 0.4 + 1, "b": 2 * 1.6 + 1})
    assert _route(router, [a, b], chain=[]) == "a"
    idle_a, idle_b = _replica("a", stepping(10.0, 0)), _replica("b", stepping(40.0, 0))
    router = _router(balance="load")
    assert router.replica_loads([idle_a, idle_b], 96) == {"a": 1, "b": 1}
    c = _replica("c", stepping(None))
    router = _router(balance="load")
    for replica in (a, c):
        router.replica_queue_len_cache.update(replica.replica_id, 2)
    assert router.replica_loads([a, c], 96) == {"a": 3, "c": 3}  # c has no step time: a is the median



def test_a_prompt_counts_only_the_blocks_not_held_where_its_prefix_runs(tiny_model_dir):
    """A real core with one request running on a 64-token prefix (its 4 full blocks held) and 3
    blocks free: a prompt on that prefix (72 tokens, 5 blocks, 4 of them shared) starts at once
    there (the engine admits it in its next step, nothing waiting), so it scores as starting at
    once (1 running + 1), not as queued for want of its 5 blocks (1 + 4). The router knows what
    is held from the chains it sent to the replica that have not completed: a replica with
    none in flight counts the prompt's blocks whole, and so does this one once its request
    completed (the blocks free again, maybe only cached: counted among the free ones)."""
    args = EngineArgs(model=tiny_model_dir("llama"), device="cpu", dtype="float32", num_kv_blocks=8,
                      max_model_len=128, max_num_seqs=4)
    core = EngineCore(args)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prefix = [(11 * j) % 90 + 3 for j in range(64)]
    core.add_request(EngineCoreRequest("r0", prefix + [1] * 8, params, 0.0))
    core.step()
    report = _core_report(core, in_flight=1, samples=1, block_size=args.block_size)
    assert (report["load"]["running"], report["load"]["waiting"], report["load"]["free_blocks"]) == (1, 0, 3)
    assert replica_score(report, 1, 72) == 1 + 4  # its 5 blocks against 3 free
    assert replica_score(report, 1, 72, shared_tokens=64) == 1 + 1  # 1 block of its own
    assert replica_score(report, 1, 72, shared_tokens=32) == 1 + 1  # 2 shared: its 3 fit
    assert replica_score(report, 1, 72, shared_tokens=16) == 1 + 4  # 1 shared: its 4 do not
    core.add_request(EngineCoreRequest("r1", prefix + [2] * 8, params, 0.0))
    core.step()  # the engine agrees: admitted at once, beside r0
    assert len(core.scheduler.running) == 2 and not core.scheduler.waiting

    links = [201, 202, 203, 204]  # the prefix's chain: four 16-token chunks
    router = _router(balance="load", chunk_tokens=16)
    a, b = _replica("a", report), _replica("b", report)

    async def send():
        pending = PendingRequest(args=[], kwargs={"prefix_hashes": links}, metadata=RequestMetadata(
            request_id="x", internal_request_id="held"))
        await router.choose_replicas([a], pending)
        pending.future.set_result(a)
        router.on_send_request(a.replica_id)

    asyncio.run(send())
    router.on_send_request(b.replica_id)  # b runs a request too, on another prefix (unnamed)
    assert router.replica_loads([a, b], 72, 1, links + [205]) == {"a": 1 + 1, "b": 1 + 4}
    assert router.replica_loads([a, b], 72, 1, [209] + links) == {"a": 1 + 4, "b": 1 + 4}  # not a prefix
    router.on_request_completed(a.replica_id, "held")
    router.on_new_queue_len_info(a.replica_id, 1)  # (its engine still reports it running)
    assert router._chains == {} and router._live == {"a": {}}
    assert router.replica_loads([a], 72, 1, links)["a"] == 1 + 4
