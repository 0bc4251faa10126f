"""Data parallelism on one host (``data_parallel_size``): N engine cores behind one front end.

Offline (``LLM(data_parallel_size=2)``) and the serving front end (``AsyncLLM``): greedy outputs
equal to one engine's, requests spread over both cores, aborts reaching the core that holds the
request, and a killed core failing the engine clearly. The load balancer's policy is checked
on its own (plain Python). The HTTP server with ``-dp 2``: tests/server/test_data_parallel_server.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tessellm.core.engine_core import EngineCoreRequest
from tessellm.core.engine_process import EngineDeadError
from tessellm.core.load_balance import LoadBalancer, iter_request_block_hashes, request_block_hashes
from tessellm.core.load_report import StepTimer, speed_factors

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [(7 * i + j) % 90 + 3 for j in range(5 + i)]} for i in range(8)]


def _kwargs(**extra) -> dict:
    return dict(device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128, **extra)


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


# -- the balancer ------------------------------------------------------------------------------

def test_balancer_spreads_and_releases():
    lb = LoadBalancer(2, block_size=4, policy="tokens")
    picks = []
    for i in range(6):  # prompts shorter than a block: no affinity, least loaded, round-robin
        core = lb.pick([i, i + 1])
        lb.assign(f"r{i}", core, 2)
        picks.append(core)
    assert picks == [0, 1, 0, 1, 0, 1] and lb.num_requests == [3, 3] and lb.load == [6, 6]
    assert lb.release("r0") == 0 and lb.release("r0") is None
    assert lb.pick([9]) == 0  # now the least loaded
    assert lb.load == [4, 6] and lb.num_requests == [2, 3]


def test_balancer_weighs_tokens_not_requests():
    """One long request is more load than three short ones, and a request's generated tokens
    add to its core's load until it is released."""
    lb = LoadBalancer(2, block_size=4, policy="tokens")
    lb.assign("long", 0, 3000)
    for i in range(3):
        lb.assign(f"short{i}", 1, 20)
    assert lb.pick(list(range(20))) == 1  # fewer tokens, though more requests
    lb.generated("short0", 5)
    lb.generated("long", 7)
    assert lb.load == [3007, 65]
    for _ in range(200):  # a long decode on core 1 makes it the busier one
        lb.generated("short1", 20)
    assert lb.load[1] > lb.load[0] and lb.pick(list(range(20))) == 0
    lb.release("short1")
    lb.generated("short1", 5)  # a late output of a released request: ignored
    assert lb.load == [3007, 45] and lb.num_requests == [1, 2]


def test_balancer_prefers_the_prefix_holder_while_loads_are_close():
    lb = LoadBalancer(2, block_size=4, policy="tokens")
    shared = list(range(100, 108))  # two full blocks
    first = lb.pick(shared + [1])
    lb.assign("a", first, 9)
    # Same two leading blocks: the same core while it is at most 16 blocks of tokens (64 here:
    # more than two 9-token requests) above the other.
    for i in range(6):
        assert lb.pick(shared + [2]) == first
        lb.assign(f"b{i}", first, 9)
    assert lb.load[first] == 63
    lb.assign("c", first, 9)
    # 72 tokens there: still within 64 + the 8 prompt tokens its cache saves this request
    assert lb.pick(shared + [3]) == first
    lb.assign("d", first, 9)
    other = lb.pick(shared + [3])  # 81 tokens in flight there, 0 here: load wins
    assert other != first
    # A LoRA adapter is a link of its own: its requests gather where it went first, short
    # prompts too; another adapter's go to the least loaded core.
    lb = LoadBalancer(2, block_size=4, policy="tokens")
    lora_core = lb.pick(list(range(50, 58)), lora_id=7)
    lb.assign("l1", lora_core, 8)
    assert lb.pick(list(range(60, 68)), lora_id=7) == lora_core
    assert lb.pick([1, 2], lora_id=7) == lora_core
    assert lb.pick([3, 4], lora_id=8) != lora_core


def _report(lb, core, **figures):
    """Core ``core`` reports (as ``core_load`` would), having received all it was sent."""
    lb.report(core, {"received": lb.sent[core], **figures})


def _send(lb, rid, prompt_len=8, **kw):
    core = lb.pick(list(range(100 + prompt_len, 100 + 2 * prompt_len)), **kw)
    lb.assign(rid, core, prompt_len)
    return core


def test_load_policy_avoids_a_core_stalled_by_a_full_batch_or_kv():
    """The cores' own figures show what the front end's token count cannot: a queue behind a
    full batch (max_num_seqs) or a full KV cache, or a long prefill ahead. The load policy
    sends the request elsewhere; the tokens policy, seeing few tokens there, does not."""
    def stalled(policy, **core0):
        lb = LoadBalancer(2, block_size=4, affinity=False, policy=policy)
        for i in range(4):  # four short chats on core 0, one long prompt on core 1
            lb.assign(f"s{i}", 0, 10)
        lb.assign("long", 1, 400)
        _report(lb, 0, **core0)
        _report(lb, 1, waiting=0, running=1, free_seqs=1, free_blocks=100)
        return lb.pick(list(range(12)))

    full_batch = dict(waiting=2, running=2, free_seqs=0, free_blocks=100)  # max_num_seqs=2
    assert stalled("tokens", **full_batch) == 0  # 40 tokens there against 400
    assert stalled("load", **full_batch) == 1  # 4 x 2 waiting + 2 running there, 1 here
    full_kv = dict(waiting=0, running=1, free_seqs=5, free_blocks=2)  # 12 tokens need 3 blocks
    assert stalled("tokens", **full_kv) == 0
    assert stalled("load", **full_kv) == 1
    long_prefill = dict(waiting=0, running=1, free_seqs=5, free_blocks=100, prefill_steps=3)
    assert stalled("load", **long_prefill) == 1
    idle_room = dict(waiting=0, running=1, free_seqs=5, free_blocks=100)
    assert stalled("load", **idle_room) == 0  # equal scores: fewer tokens


def test_load_policy_counts_what_was_sent_since_the_report():
    """Requests sent to a core that its last report does not count yet (it reports how many
    adds it received) weigh as queued there: a burst spreads over the cores instead of landing
    on the one that last looked idle, and a report that has caught up replaces the estimate."""
    lb = LoadBalancer(2, block_size=4, affinity=False)
    assert lb.policy == "load"
    _report(lb, 0, waiting=0, running=3, free_seqs=5, free_blocks=100)
    _report(lb, 1, waiting=0, running=0, free_seqs=8, free_blocks=100)
    picks = [_send(lb, f"r{i}") for i in range(5)]  # no report in between
    # core 1 scores 1, then 4 x 1 queued + 4 = 8, 12, 16; core 0: 3 + 1 = 4, then 11, 15
    assert picks == [1, 0, 1, 0, 1], picks
    assert lb.score(1, 8) == 4 * 3 + 0 + 4
    # Core 1 has received all three and runs them; core 0 has received one of its two.
    lb.report(1, {"received": 3, "waiting": 0, "running": 3, "free_seqs": 5, "free_blocks": 90})
    lb.report(0, {"received": 1, "waiting": 0, "running": 4, "free_seqs": 4, "free_blocks": 90})
    assert lb.score(1, 8) == 3 + 1 and lb.score(0, 8) == 4 * 1 + 4 + 4
    assert _send(lb, "r5") == 1
    # A core that keeps requests waiting gets none while another starts them at once.
    lb.report(0, {"received": 2, "waiting": 3, "running": 2, "free_seqs": 0, "free_blocks": 0})
    for i in range(4):
        _report(lb, 1, waiting=0, running=4 + i, free_seqs=4 - i, free_blocks=80)
        assert _send(lb, f"q{i}") == 1  # 5 + i against 4 x 3 + 2 + 4 = 18


def test_load_policy_keeps_prefix_and_adapter_affinity():
    """Affinity within two score points of the least (two requests that start at once): an
    adapter's requests gather on the core that ran it, and spill once that core would queue."""
    lb = LoadBalancer(2, block_size=4)
    first = _send(lb, "a0", lora_id=7)
    _report(lb, first, waiting=0, running=1, free_seqs=3, free_blocks=100)
    _report(lb, 1 - first, waiting=0, running=0, free_seqs=4, free_blocks=100)
    assert _send(lb, "a1", lora_id=7) == first  # 1 + 1 against 1: within the slack
    _report(lb, first, waiting=0, running=2, free_seqs=2, free_blocks=100)
    assert _send(lb, "a2", lora_id=7) == first  # 3 against 1
    _report(lb, first, waiting=0, running=3, free_seqs=1, free_blocks=100)
    assert _send(lb, "a3", lora_id=7) == 1 - first  # 4 against 1: spills
    # Another adapter: by score alone; a3 has not reached its core yet (8 against 4).
    assert _send(lb, "b0", lora_id=8) == first


def test_load_policy_follows_the_cores_reported_caches():
    """The cores' reports of what their prefix caches hold steer a request to the core holding
    the longest run of its prompt's blocks, while that core's score is within the threshold
    (2 points, plus 4 per whole step of token budget its cache saves); an eviction or a reset
    reported by a core is reflected at once."""
    lb = LoadBalancer(2, block_size=4)
    prompt = list(range(200, 213))  # three full blocks and a tail
    hashes = request_block_hashes(EngineCoreRequest("p", prompt, GREEDY, 0.0), 4)
    pick = lambda: lb.pick(prompt, block_hashes=hashes)  # noqa: E731
    idle = dict(waiting=0, running=0, free_seqs=4, free_blocks=100, token_budget=64)
    _report(lb, 0, **idle)
    lb.report(1, {"received": 0, **idle}, {"added": [h & (2**64 - 1) for h in hashes[:2]]})
    assert lb.view.depths(lb.chain(prompt, block_hashes=hashes)) == [0, 2]
    assert pick() == 1 and pick() == 1  # not round-robin: the holder
    lb.report(0, None, {"added": [h & (2**64 - 1) for h in hashes]})  # all three on core 0
    assert pick() == 0
    lb.report(0, None, {"removed": [hashes[1] & (2**64 - 1)]})  # core 0 evicted the second block
    assert pick() == 1
    # Core 1 busy: 4 x 1 waiting + 4 = 8 points against 1, past 1 + 2: core 0 (one block held)
    _report(lb, 1, **{**idle, "waiting": 1})
    assert pick() == 0
    # ... unless its cache saves whole steps: one 4-token block more than core 0's, in steps
    # of 2 tokens, is 2 steps, 8 points: 8 <= 1 + 2 + 8
    _report(lb, 1, **{**idle, "waiting": 1, "token_budget": 2})
    assert pick() == 1
    lb.report(1, None, {"reset": True})  # core 1's cache was reset (sleep, new weights)
    assert lb.view.depths(lb.chain(prompt, block_hashes=hashes)) == [1, 0] and pick() == 0


def test_balancer_measures_a_long_cached_prefix_whole():
    """Past the first ``max_blocks`` blocks the prompt's hashes are read on only while some
    core holds every block so far: a long cached prefix counts whole (and buys more slack),
    and a prompt nobody holds that far costs no more hashing."""
    lb = LoadBalancer(2, block_size=4, max_blocks=2)
    prompt = list(range(300, 325))  # six full blocks and a tail
    hashes = [h & (2**64 - 1) for h in iter_request_block_hashes(EngineCoreRequest("p", prompt, GREEDY, 0.0), 4)]
    assert len(hashes) == 6
    reads = []

    def counted():
        for h in hashes:
            reads.append(h)
            yield h

    assert lb.pick(prompt, block_hashes=counted()) == 0 and len(reads) == 2  # nobody holds any
    reads.clear()
    idle = dict(waiting=0, running=0, free_seqs=4, free_blocks=100, token_budget=8)
    lb.report(0, {"received": 0, **idle}, {"added": hashes[:2]})
    _report(lb, 1, **{**idle, "waiting": 1})  # 8 points against 1
    assert lb.pick(prompt, block_hashes=counted()) == 0 and len(reads) == 3  # one past the 2: nobody
    lb.report(1, None, {"added": hashes})
    reads.clear()
    # Core 1 holds 4 blocks (16 tokens, 2 steps of 8: 8 points) more than core 0: 8 <= 1 + 2 + 8
    assert lb.pick(prompt, block_hashes=counted()) == 1 and len(reads) == 6
    lb.report(1, None, {"removed": hashes[3:]})  # 1 block more: no whole step, 8 > 1 + 2
    assert lb.pick(prompt, block_hashes=iter(hashes)) == 0


def test_burst_gathers_on_the_prefix_holder_while_it_has_room():
    """Requests sent since a core's report count as queued (a burst spreads), except on a core
    holding more of the prompt whose report shows room for them: there they will start at once,
    so a burst sharing its cached prefix gathers there until its slots run out."""
    lb = LoadBalancer(2, block_size=4)
    prompt = list(range(400, 413))  # three full blocks and a tail
    hashes = [h & (2**64 - 1) for h in iter_request_block_hashes(EngineCoreRequest("p", prompt, GREEDY, 0.0), 4)]
    lb.report(0, {"received": 0, "waiting": 0, "running": 0, "free_seqs": 3, "free_blocks": 100}, {"added": hashes})
    _report(lb, 1, waiting=0, running=0, free_seqs=8, free_blocks=100)
    picks = []
    for i in range(5):
        picks.append(lb.pick(prompt))
        lb.assign(f"r{i}", picks[-1], len(prompt))
    # core 0 as a holder: 1 + 1, 2 + 1 against 1 (within 2); then 3 requests unreceived and 3
    # free slots: no room, 4 x 3 + 4 = 16 points; core 1 then holds the chain in flight too
    assert picks == [0, 0, 0, 1, 1], picks
    lb.report(0, {"received": 3, "waiting": 0, "running": 3, "free_seqs": 0, "free_blocks": 90})
    lb.report(1, {"received": 2, "waiting": 0, "running": 2, "free_seqs": 6, "free_blocks": 90})
    assert lb.pick(prompt) == 1  # both hold it: 3 + 4 against 2 + 1


def test_balancer_weighs_a_host_tier_hit_between_a_device_hit_and_a_miss():
    """Three idle cores: one holds the prompt's blocks on the device, one in its host tier
    (evicted there), one nothing. The device holder wins; without it, the host-tier holder
    beats the cold core (round-robin's next); a host run continuing a shorter device run counts
    too. Its worth buys slack at 3/4 of a device block's: here three blocks of 4 tokens in
    steps of 2 tokens, 4 points a step, 3 x 2 x 3 = 18 points over a device hit's 24."""
    lb = LoadBalancer(3, block_size=4)
    prompt = list(range(500, 513))  # three full blocks and a tail
    hashes = [h & (2**64 - 1) for h in iter_request_block_hashes(EngineCoreRequest("p", prompt, GREEDY, 0.0), 4)]
    idle = dict(waiting=0, running=0, free_seqs=4, free_blocks=100, token_budget=2)
    lb.report(0, {"received": 0, **idle}, {"added": hashes})
    lb.report(1, {"received": 0, **idle}, {"host_added": hashes})
    _report(lb, 2, **idle)
    assert lb.view.tiered_depths(lb.chain(prompt)) == [(3, 0), (0, 3), (0, 0)]
    assert [lb.pick(prompt) for _ in range(3)] == [0, 0, 0]
    lb.report(0, None, {"reset": True})
    lb._next = 2  # round-robin would pick the cold core
    assert lb.pick(prompt) == 1
    lb.report(2, None, {"added": hashes[:1]})  # core 2: one device block, no more
    assert lb.pick(prompt) == 1  # 3 host blocks (9 quarters) over 1 device block (4)
    lb.report(2, None, {"host_added": hashes[1:]})  # ... continued from its host tier: 4 + 6
    assert lb.view.tiered_depths(lb.chain(prompt)) == [(0, 0), (0, 3), (1, 2)] and lb.pick(prompt) == 2
    # The host holder busy: 4 x 3 waiting + 4 = 16 points against 1; 3 host blocks save 18 > 16 - 1 - 2.
    lb.report(2, None, {"reset": True})
    _report(lb, 1, **{**idle, "waiting": 3})
    assert lb.pick(prompt) == 1
    _report(lb, 1, **{**idle, "waiting": 4})  # 20 points: past 1 + 2 + 18: the cold core
    assert lb.pick(prompt) in (0, 2)
    _report(lb, 0, **idle)
    lb.report(0, None, {"added": hashes})  # a device holder as busy would keep it: 24 points
    _report(lb, 0, **{**idle, "waiting": 4})
    assert lb.pick(prompt) == 0


def _share(step_ms: list, n: int = 60) -> list[int]:
    """Requests each of two cores gets out of ``n``, each core reporting after every pick that
    it runs all it was sent (none finish), with ``step_ms`` as its step time."""
    lb = LoadBalancer(2, block_size=4, affinity=False)
    for i in range(n):
        for c in range(2):
            sent = lb.sent[c]
            lb.report(c, {"received": sent, "waiting": 0, "running": sent, "free_seqs": 1000,
                          "free_blocks": 10_000, "step_ms": step_ms[c]})
        lb.assign(f"r{i}", lb.pick([1] * 8), 8)
    return list(lb.sent)


def test_speed_weighting_shifts_share(monkeypatch):
    """A core whose steps take twice as long gets about half the share; equal cores, cores a
    little apart (noise, within the dead band), and a core with no step time yet (counted as
    average) share evenly; a very slow core is clamped (it still gets some)."""
    assert speed_factors([10.0, 40.0]) == [1.0, 1.0]  # off by default
    monkeypatch.setenv("TESSELLM_BALANCE_BY_STEP_TIME", "1")
    assert _share([10.0, 10.0]) == [30, 30]
    assert _share([10.0, 11.0]) == [30, 30]
    assert _share([10.0, None]) == [30, 30]
    fast, slow = _share([10.0, 20.0])
    assert 38 <= fast <= 42 and fast + slow == 60  # 2 : 1
    fast, slow = _share([10.0, 1000.0])
    assert 5 <= slow <= 8  # factors 1/4 (clamped) and about 2 (over the median 505): 8 : 1
    # Idle cores tie whatever their speeds: round-robin, not the faster one every time.
    lb = LoadBalancer(2, block_size=4, affinity=False)
    for c, ms in enumerate((10.0, 40.0)):
        lb.report(c, {"received": 0, "running": 0, "free_seqs": 4, "free_blocks": 100, "step_ms": ms})
    assert [lb.pick([1] * 8) for _ in range(4)] == [0, 1, 0, 1]
    # A core's step time: none before its 8th busy step, then a moving average (1/16 a step).
    timer = StepTimer()
    for _ in range(7):
        timer.record(0.010)
    assert timer.ms is None
    timer.record(0.010)
    assert timer.ms == pytest.approx(10.0)
    timer.record(0.026)
    assert timer.ms == pytest.approx(11.0)


def test_balance_policy_is_checked():
    with pytest.raises(ValueError, match="data_parallel_balance 'queue' is not supported; use load"):
        LoadBalancer(2, block_size=4, policy="queue")
    with pytest.raises(ValueError, match="data_parallel_balance 'least' is not supported; use load"):
        EngineArgs(data_parallel_size=2, data_parallel_balance="least").validate()
    from tessellm.entrypoints.cli import build_parser

    with pytest.raises(SystemExit):  # argparse: invalid choice, naming load and tokens
        build_parser().parse_args(["serve", "M", "-dp", "2", "--data-parallel-balance", "least"])


def test_balancer_tells_prompt_embeds_apart():
    """Prompts given as embeddings carry placeholder token ids (all 0): their block hashes are
    keyed on the embeddings' hash (as the core's), so different embeddings are not one shared
    prefix, and equal ones are."""
    import torch

    from tessellm.core.engine_core import EngineCoreRequest
    from tessellm.core.prompt_embeds import PromptEmbeds

    def request(seed: int) -> EngineCoreRequest:
        embeds = PromptEmbeds.from_tensor(torch.randn(8, 4, generator=torch.Generator().manual_seed(seed)),
                                          4, "float32")
        return EngineCoreRequest(f"r{seed}", [0] * 8, GREEDY, 0.0, prompt_embeds=embeds)

    lb = LoadBalancer(2, block_size=4, policy="tokens")
    a, b, a2 = request(1), request(2), request(1)
    chain = lambda r: lb.chain(r.prompt_token_ids, block_hashes=request_block_hashes(r, 4))  # noqa: E731
    assert chain(a) == chain(a2) and len(chain(a)) == 2
    assert not set(chain(a)) & set(chain(b))
    pick = lambda r: lb.pick(r.prompt_token_ids, block_hashes=request_block_hashes(r, 4))  # noqa: E731
    first = pick(a)
    lb.assign("a", first, 8)
    assert pick(b) != first  # no shared prefix: least loaded
    assert pick(a2) == first


def test_data_parallel_rank_is_checked():
    with pytest.raises(ValueError, match="data_parallel_rank"):
        EngineArgs(data_parallel_size=2, data_parallel_rank=2).validate()
    with pytest.raises(ValueError, match="Ray Serve replicas"):
        EngineArgs(data_parallel_size=2, distributed_executor_backend="ray").validate()


# -- offline -----------------------------------------------------------------------------------

def test_offline_dp2(tiny_model_dir):
    """Greedy tokens equal dp=1's in input order, both cores ran prompts, and a killed core fails
    the engine with an error naming it (never a hang), then every later call too."""
    path = tiny_model_dir("llama")
    with LLM(path, **_kwargs()) as one:
        expected = _tokens(one.generate(PROMPTS, GREEDY, use_tqdm=False))
    with LLM(path, disable_log_stats=False, **_kwargs(data_parallel_size=2)) as two:  # get_metrics
        got = two.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.request_id for o in got] == [str(i) for i in range(len(PROMPTS))]  # input order
        assert _tokens(got) == expected
        sent = two.engine.requests_sent()
        assert sent == [4, 4], sent
        # Each core really ran its share: its prefix-cache lookups count its prompts' tokens.
        queried = [s["prefix_cache_queries"] for s in two.engine.core_stats()]
        assert all(q > 0 for q in queried) and sum(queried) == sum(len(p["prompt_token_ids"]) for p in PROMPTS)
        # vLLM's views: get_metrics() adds the cores' counts up; llm_engine's config views
        names = ("tessellm:prompt_tokens", "tessellm:prefix_cache_queries")
        assert {m.name: m.value for m in two.get_metrics() if m.name in names} == dict.fromkeys(names, sum(queried))
        (steps,) = [m for m in two.get_metrics() if m.name == "tessellm:iteration_tokens_total"]
        assert steps.count > 0 and steps.sum > 0  # the cores' steps, from their outputs messages
        assert two.llm_engine.vllm_config.parallel_config.data_parallel_size == 2
        assert two.llm_engine.model_config.max_model_len == 128
        with pytest.raises(NotImplementedError, match="start_profile"):  # names what was asked for
            two.start_profile()
        # The engine goes on after a batch.
        assert _tokens(two.generate(PROMPTS[:2], GREEDY, use_tqdm=False)) == expected[:2]
        os.kill(two.engine.cores.pids()[1], signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="engine core 1 of 2"):
            two.generate(PROMPTS, SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)
        with pytest.raises(EngineDeadError):  # and stays dead
            two.generate(PROMPTS[:1], GREEDY, use_tqdm=False)


def test_load_policy_routes_around_a_busy_core(tiny_model_dir):
    """Two cores of one request slot each (max_num_seqs=1): a long request holds one, and every
    short request after it goes to the other (the busy core has not received the long one yet,
    or reports its slot taken: a request there would queue), with greedy tokens equal to one
    engine's. Decided by the cores' reports, not by timing: each short is sent once the one
    before has finished (LLM's engine returns finished requests only)."""
    path = tiny_model_dir("llama")
    shorts = [{"prompt_token_ids": [(5 * i + j) % 90 + 3 for j in range(40)]} for i in range(4)]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    kw = {**_kwargs(max_num_seqs=1), "max_model_len": 512}
    with LLM(path, **kw) as one:
        expected = _tokens(one.generate(shorts, params, use_tqdm=False))
    with LLM(path, **kw, data_parallel_size=2, data_parallel_balance="load") as two:
        engine = two.engine
        engine.add_request("long", {"prompt_token_ids": [3, 4, 5, 6, 7]},
                           SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
        busy = engine.cores.owner("long")
        got = []
        for i, prompt in enumerate(shorts):
            engine.add_request(f"s{i}", prompt, params)
            assert engine.cores.owner(f"s{i}") == 1 - busy, engine.cores.balancer.reports
            done = None
            while done is None:
                done = next((o for o in engine.step() if o.request_id == f"s{i}" and o.finished), None)
            got.append(list(done.outputs[0].token_ids))
        assert engine.cores.owner("long") == busy, "the long request finished before the shorts"
        # What the cores reported with their last outputs: the balancer's figures. The busy core
        # may not have sent a message since it took the long request (on a loaded machine its
        # first step can end after the shorts'): read its messages until it has (500 tokens to
        # go, so it is still running then), within a bound so a core that never reports fails.
        reports = engine.cores.balancer.reports
        deadline = time.monotonic() + 120
        while reports[busy].received == 0 and time.monotonic() < deadline:
            for core, msg in engine._receive():  # step() would wait for the long one to finish
                assert not engine._handle(core, msg), "the long request finished early"
        assert (reports[busy].received, reports[busy].running, reports[busy].free_seqs) == (1, 1, 0)
        assert (reports[1 - busy].received, reports[1 - busy].running) == (len(shorts), 0)
        sent = engine.requests_sent()
        assert sent[busy] == 1 and sent[1 - busy] == len(shorts), sent
        assert got == expected
        engine.abort_request("long")


def test_prefix_goes_to_the_core_that_caches_it(tiny_model_dir):
    """Two cores of 16 KV blocks and one request slot each; what each core's prefix cache
    holds is read from its reports, and seen through the cores' own prefix-cache hit counts:

    * a prompt sharing a cached 4-block prefix goes to the core that holds it (its hits grow by
      the prefix; round-robin would have sent it to the other core);
    * a core holding the prefix but busy (its slot taken: score 5 against 1, past the 2-point
      threshold) loses the request to the idle core, which computes the whole prompt;
    * a core whose cache lost the prefix (a long prompt evicted it there) no longer draws it,
      though it held it too."""
    from tessellm.core.dp_engine import DPLLMEngine

    path = tiny_model_dir("llama")
    prefix = [(11 * j) % 90 + 3 for j in range(64)]  # 4 blocks of 16
    def prompt(tag: int, n: int = 8) -> dict:
        return {"prompt_token_ids": prefix + [(tag * 7 + j) % 90 + 3 for j in range(n)]}
    short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    args = EngineArgs(model=path, data_parallel_size=2, **{**_kwargs(max_num_seqs=1), "num_kv_blocks": 16,
                                                          "max_model_len": 256})
    engine = DPLLMEngine(args)
    balancer = engine.cores.balancer

    def run(*requests) -> list[int]:
        """Send (request id, prompt) pairs back to back; wait for all to finish; their cores."""
        cores = []
        for rid, p in requests:
            engine.add_request(rid, p, short)
            cores.append(engine.cores.owner(rid))
        left = {rid for rid, _ in requests}
        while left:
            left -= {o.request_id for o in engine.step() if o.finished}
        return cores

    def hits() -> list[int]:
        return [s["prefix_cache_hits"] for s in engine.core_stats()]

    try:
        (x,) = run(("p1", prompt(1)))
        (core,) = run(("p2", prompt(2)))
        assert core == x and hits()[x] == 64 and hits()[1 - x] == 0  # round-robin: the other
        # The holder busy with a long request (one slot each): the next one goes to the idle
        # core and computes its whole prompt there.
        engine.add_request("long", prompt(3), SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True))
        assert engine.cores.owner("long") == x
        while not (balancer.reports[x].received == engine.requests_sent()[x] and balancer.reports[x].running == 1):
            engine.step()
        assert balancer.score(x, 72) == 5 and balancer.score(1 - x, 72) == 1
        (core,) = run(("p3", prompt(4)))
        assert core == 1 - x and hits()[1 - x] == 0
        assert engine.cores.owner("long") == x, "the long request finished too soon"
        while engine.cores.owner("long") is not None:  # its finish comes with x's fresh report
            engine.step()
        # Both hold the prefix now. A 240-token prompt fills one core's KV cache: evicted there.
        (evicted,) = run(("fill", {"prompt_token_ids": [(5 * j) % 90 + 3 for j in range(240)]}))
        holder = 1 - evicted
        (other,) = run(("tiny", {"prompt_token_ids": [4, 5, 6]}))  # no full block: round-robin
        assert other == holder  # so round-robin's next is the evicted core ...
        before = hits()
        (core,) = run(("q", prompt(5)))  # ... but the prefix goes where it is still cached
        assert core == holder, [balancer.view.num_cached(i) for i in range(2)]
        after = hits()
        assert after[holder] - before[holder] == 64 and after[evicted] == before[evicted]
    finally:
        engine.shutdown()


def test_prefix_goes_to_the_core_whose_host_tier_holds_it(tiny_model_dir):
    """Two real cores with a host KV tier: a prefix evicted from one core's device cache into
    its host tier is reported there (not as gone), and a prompt sharing it goes to that core
    rather than to the cold one round-robin would pick; the core loads it back (its host-tier
    hits grow by the prefix). The cores report their step time too."""
    from tessellm.core.dp_engine import DPLLMEngine

    path = tiny_model_dir("llama")
    prefix = [(13 * j) % 90 + 3 for j in range(64)]  # 4 blocks of 16
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    args = EngineArgs(model=path, data_parallel_size=2, kv_offloading_size=0.01,
                      **{**_kwargs(max_num_seqs=1), "num_kv_blocks": 16, "max_model_len": 256})
    engine = DPLLMEngine(args)
    balancer = engine.cores.balancer

    def run(rid, tokens, params=short) -> int:
        engine.add_request(rid, {"prompt_token_ids": tokens}, params)
        core = engine.cores.owner(rid)
        while engine.cores.owner(rid) is not None:  # its finish comes with its core's report
            engine.step()
        return core

    def host_hits() -> list[int]:
        return [(s.get("kv_offload") or {}).get("hits", 0) for s in engine.core_stats()]

    try:
        x = run("p", prefix + [5, 6, 7])
        assert run("tiny", [4, 5, 6]) == 1 - x  # no full block: round-robin
        # 240 tokens fill x's 16 blocks: the prefix leaves its device cache for its host tier
        longer = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        assert run("fill", [(5 * j) % 90 + 3 for j in range(240)], longer) == x
        chain = balancer.chain(prefix + [8])
        assert balancer.view.tiered_depths(chain)[x] == (0, 4)
        assert balancer.view.tiered_depths(chain)[1 - x] == (0, 0)
        before = host_hits()
        assert run("q", prefix + [8, 9]) == x  # round-robin's next was the cold core
        assert host_hits()[x] - before[x] == 64 and host_hits()[1 - x] == before[1 - x]
        assert balancer.reports[x].step_ms > 0  # its step time, once it has 8 steps
    finally:
        engine.shutdown()


# -- the serving front end ---------------------------------------------------------------------

def test_async_llm_dp2(tiny_model_dir):
    """Greedy streams equal dp=1's, both cores take requests, an abort frees the request in the
    core that holds it, sleep mode's calls answer for every core, and a killed core fails the
    in-flight requests and the health check."""
    from tessellm.entrypoints.async_llm import AsyncLLM

    path = tiny_model_dir("llama")
    with LLM(path, **_kwargs()) as one:
        expected = _tokens(one.generate(PROMPTS[:4], GREEDY, use_tqdm=False))
    # The tokens policy here (the load policy: the offline tests), the same spread for this burst.
    engine = AsyncLLM(EngineArgs(model=path, data_parallel_size=2, kernel_warmup=False,
                                 data_parallel_balance="tokens", enable_sleep_mode=True,
                                 **{**_kwargs(), "max_model_len": 512}))  # room for the long ones

    async def collect(i):
        last = None
        async for out in engine.generate(PROMPTS[i], GREEDY, request_id=f"g{i}"):
            last = out
        return list(last.outputs[0].token_ids)

    async def scenario():
        engine.start()
        await engine.wait_until_warm(120)
        assert await engine.is_ready()
        assert await asyncio.gather(*(collect(i) for i in range(4))) == expected
        per_core = await engine.call_all("stats")
        assert all(s["prefix_cache_queries"] > 0 for s in per_core), per_core
        assert engine.cores.balancer.sent == [2, 2]
        # Abort: a long request on each core, then cancel the first; only its core frees it.
        # long1 must still run at the sleep call below, however fast the cores step meanwhile
        # (100 tokens are ~0.3 s of the tiny model's steps on 2 cores, no more than the abort,
        # reset and stats round trips in between may take on a loaded machine)
        long = SamplingParams(max_tokens=480, ignore_eos=True, temperature=0.0)
        streams = [engine.add_request(f"long{i}", PROMPTS[i], long) for i in range(2)]
        owners = [engine.cores.owner(f"long{i}") for i in range(2)]
        assert sorted(owners) == [0, 1]
        started = [False, False]
        while not all(started):  # both are running
            started = [seen or s.get_nowait() is not None for seen, s in zip(started, streams)]
            await asyncio.sleep(0.02)
        view = engine.cores.balancer.view
        for _ in range(1000):  # each long request's first full block published and reported
            if all(view.num_cached(o) > 0 for o in owners):  # (5 prompt tokens: 11 decodes)
                break
            await asyncio.sleep(0.02)
        engine.abort("long0")
        for _ in range(100):
            running = [s["num_running"] for s in await engine.call_all("stats")]
            if running[owners[0]] == 0:
                break
            await asyncio.sleep(0.05)
        assert running[owners[0]] == 0 and running[owners[1]] == 1, running
        assert engine.cores.loads()[owners[0]] == 0
        # Sleep mode reaches every core: the busy core refuses, the idle one sleeps, and the
        # front end refuses requests until wake_up; a reset is done only if every core did it.
        assert view.num_cached(owners[0]) > 0  # long0's published blocks, kept after its abort
        assert not await engine.reset_prefix_cache()
        for _ in range(100):  # the idle core did reset: it says so at once, not at its next step
            if view.num_cached(owners[0]) == 0:
                break
            await asyncio.sleep(0.02)
        assert view.num_cached(owners[0]) == 0 and view.num_cached(owners[1]) > 0
        with pytest.raises(ValueError, match=f"engine core {owners[1]} of 2: sleep: 1 request"):
            await engine.sleep(1)
        assert engine.sleeping and await engine.is_sleeping()
        await engine.wake_up()
        assert not engine.sleeping and not await engine.is_sleeping()
        # Kill the core running a long request: its stream errors, the engine reports dead.
        stream = engine.add_request("long2", PROMPTS[1], long)
        owner = engine.cores.owner("long2")
        while stream.get_nowait() is None:
            await asyncio.sleep(0.02)
        os.kill(engine.cores.pids()[owner], signal.SIGKILL)
        with pytest.raises(EngineDeadError, match=f"engine core {owner} of 2"):
            async for _ in _drain(stream):
                pass
        assert engine.is_dead and not await engine.is_ready()
        with pytest.raises(EngineDeadError):
            engine.add_request("late", PROMPTS[0], GREEDY)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        engine.close()


async def _drain(stream):
    from tessellm.entrypoints.async_llm import iterate_streams

    async for item in iterate_streams([stream], stream.event):
        yield item


# -- on GPUs -------------------------------------------------------------------------------------

def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("tp", [1, 2])
def test_cuda_cores_take_their_own_devices(tiny_model_dir, tp):
    """Core r on devices r*tp .. r*tp+tp-1, greedy tokens equal one GPU's; more cores than the
    visible devices hold is refused with one sentence."""
    from tessellm.core.engine_process import EngineStartupError

    count = _cuda_count()
    if 2 * tp > count:
        pytest.skip(f"needs {2 * tp} CUDA GPUs")
    path = tiny_model_dir("llama-sharp")
    kw = dict(device="cuda", dtype="float32", num_kv_blocks=64, seed=0, max_model_len=128)
    with LLM(path, **kw) as one:
        expected = _tokens(one.generate(PROMPTS, GREEDY, use_tqdm=False))
    with LLM(path, data_parallel_size=2, tensor_parallel_size=tp, **kw) as two:
        devices = [client.info.devices for client in two.engine.cores.clients]
        assert devices == [[f"cuda:{r * tp + i}" for i in range(tp)] for r in range(2)], devices
        assert _tokens(two.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
        assert min(two.engine.requests_sent()) > 0
    cores = count // tp + 1
    with pytest.raises(EngineStartupError, match=f"needs {cores * tp} cuda devices, but {count} are visible"):
        LLM(path, data_parallel_size=cores, tensor_parallel_size=tp, **kw)


def test_offline_dp2_get_metrics_under_vllms_names(tiny_model_dir):
    """LLM(data_parallel_size=2, metrics_names="vllm").get_metrics(): each core's gauges as
    vLLM's ``{engine="i"}`` series (vLLM's get_metrics shows them per engine), not dropped."""
    path = tiny_model_dir("llama")
    with LLM(path, disable_log_stats=False, metrics_names="vllm",
             **_kwargs(data_parallel_size=2)) as two:
        two.generate(PROMPTS, GREEDY, use_tqdm=False)
        two.llm_engine.add_request("gone", {"prompt_token_ids": [3, 4, 5]}, GREEDY)
        two.llm_engine.abort_request("gone")  # offline aborts count as the server's
        metrics = two.get_metrics()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert sorted(m.labels["engine"] for m in metrics if m.name == name) == ["0", "1"], name
    assert {m.name for m in metrics} >= {"vllm:prompt_tokens", "vllm:cache_config_info"}
    by_reason = [m for m in metrics if m.name == "vllm:num_requests_waiting_by_reason"]
    assert sorted(m.labels["reason"] for m in by_reason) == ["capacity", "deferred"]  # the whole engine's
    assert all("engine" not in m.labels for m in by_reason)
    (aborts,) = [m for m in metrics if m.name == "vllm:request_success" and m.labels["finished_reason"] == "abort"]
    assert aborts.value == 1
