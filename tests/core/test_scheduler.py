"""Scheduler without torch: budgets, chunked prefill, prefix hits, preemption, abort."""

from __future__ import annotations

import pytest

from tessellm.core.block_manager import BlockManager
from tessellm.core.request import Request, RequestStatus
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.scheduler import Scheduler, SchedulerConfig
from tests.scheduler_steps import run_step, sampled_tokens


def make(num_blocks=64, block_size=4, budget=64, max_seqs=8, max_len=256, prefix=True):
    kv = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len), kv)


def req(rid, n, max_tokens=4, start=1, **kw):
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens, **kw),
                   eos_token_ids=[0])


def test_prefill_then_decode_mixed_in_one_step():
    s = make()
    s.add_request(req("a", 10))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 10}
    s.add_request(req("b", 6, start=100))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 6}
    assert [r.request_id for r in out.new_requests] == ["b"]
    assert [c.request_id for c in out.cached_requests] == ["a"]


def test_chunked_prefill_accounting():
    s = make(budget=8)
    s.add_request(req("a", 20))
    chunks = []
    while s.requests["a"].num_output_tokens == 0:
        out, outs = run_step(s)
        chunks.append(out.num_scheduled_tokens["a"])
        assert out.total_num_scheduled_tokens <= 8
    assert chunks == [8, 8, 4]
    assert s.requests["a"].num_computed_tokens == 20


def test_token_budget_and_max_seqs():
    s = make(budget=16, max_seqs=2)
    for i in range(4):
        s.add_request(req(f"r{i}", 5))
    out, _ = run_step(s)
    assert len(out.num_scheduled_tokens) == 2 and out.total_num_scheduled_tokens == 10
    assert len(s.waiting) == 2


def test_finishes_on_max_tokens_eos_and_stop_token():
    s = make()
    s.add_request(req("len", 3, max_tokens=2))
    s.add_request(req("eos", 3, max_tokens=9))
    s.add_request(req("stop", 3, max_tokens=9, stop_token_ids=[5]))
    out = s.schedule()
    outs = s.update(out, {"len": [7], "eos": [0], "stop": [5]})
    reasons = {o.request_id: o.finish_reason for o in outs}
    assert reasons == {"len": None, "eos": "stop", "stop": "stop"}
    out = s.schedule()
    outs = s.update(out, {"len": [7]})
    assert outs[0].finish_reason == "length"
    assert not s.has_unfinished() and s.kv.num_free_blocks == s.kv.num_blocks


def test_min_tokens_defers_eos_and_ignore_eos():
    s = make()
    s.add_request(req("a", 3, max_tokens=9, min_tokens=2))
    s.add_request(req("b", 3, max_tokens=9, ignore_eos=True))
    out = s.schedule()
    outs = s.update(out, {"a": [0], "b": [0]})
    assert all(o.finish_reason is None for o in outs)


def test_prefix_hit_skips_computed_tokens():
    s = make(block_size=4)
    s.add_request(req("a", 12, max_tokens=1))
    run_step(s)
    s.add_request(req("b", 12))
    out = s.schedule()
    new = out.new_requests[0]
    assert new.num_computed_tokens == 8 and out.num_scheduled_tokens["b"] == 4


def test_preemption_and_resume_recomputes_everything():
    # Each needs 7 blocks, both 14. Without prefix caching, a resume recomputes every token.
    s = make(num_blocks=10, block_size=4, budget=64, prefix=False)
    s.add_request(req("old", 8, max_tokens=20))
    s.add_request(req("new", 8, max_tokens=20))
    run_step(s)  # both prefilled: 2 + 2 blocks plus room for decode
    preempted_seen = False
    for _ in range(30):
        out, _ = run_step(s)
        if out.num_preempted:
            preempted_seen = True
            victim = s.requests["new"]
            assert victim.status == RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
            assert "new" in out.preempted_request_ids and "new" not in out.finished_request_ids
            assert "old" in out.num_scheduled_tokens
            break
    assert preempted_seen
    while s.requests.get("old") is not None:
        run_step(s)
    out, _ = run_step(s)
    resumed = out.new_requests[0]
    assert resumed.request_id == "new" and len(resumed.all_token_ids) > 8  # prompt + output so far
    assert out.num_scheduled_tokens["new"] == len(resumed.all_token_ids) - resumed.num_computed_tokens


def test_abort_frees_blocks_and_is_reported():
    s = make()
    s.add_request(req("a", 10))
    s.add_request(req("b", 10))
    run_step(s)
    s.abort_requests(["a", "unknown"])
    assert "a" not in s.requests
    out = s.schedule()
    assert "a" in out.finished_request_ids and list(out.num_scheduled_tokens) == ["b"]
    s.abort_requests(["b"])
    assert s.kv.num_free_blocks == s.kv.num_blocks and not s.has_unfinished()


def test_sibling_waits_for_shared_prompt():
    s = make(block_size=4)
    s.add_request(req("0_x", 12))
    sib = Request("1_x", list(range(1, 13)), SamplingParams(max_tokens=4), wait_for="0_x")
    s.add_request(sib)
    out, _ = run_step(s)
    assert list(out.num_scheduled_tokens) == ["0_x"]
    out, _ = run_step(s)
    assert out.new_requests[0].request_id == "1_x" and out.new_requests[0].num_computed_tokens == 8


@pytest.mark.parametrize("n,msg", [(0, "empty"), (256, "context length")])
def test_rejects_prompts_that_can_never_run(n, msg):
    s = make(max_len=256)
    with pytest.raises(ValueError, match=msg):
        s.add_request(req("a", n))
    small = make(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV cache"):
        small.add_request(req("b", 20))


def test_request_that_outgrows_the_whole_cache_ends_instead_of_livelocking():
    s = make(num_blocks=3, block_size=4)  # 12 tokens in all
    s.add_request(req("big", 5, max_tokens=40))
    for _ in range(20):
        run_step(s)
        ended = s.take_finished_outputs()
        if ended:
            break
    assert [(o.request_id, o.finish_reason) for o in ended] == [("big", "length")]
    assert not s.has_unfinished() and s.kv.num_free_blocks == s.kv.num_blocks


def test_preempted_request_resumes_from_its_cached_blocks():
    s = make(num_blocks=10, block_size=4, budget=64, prefix=True)
    s.add_request(req("old", 8, max_tokens=20))
    s.add_request(req("new", 8, max_tokens=20, start=100))
    resumed = None
    for _ in range(30):
        out, _ = run_step(s)
        if out.new_requests and out.new_requests[0].request_id == "new" and out.new_requests[0].num_computed_tokens:
            resumed = out.new_requests[0]
            break
    assert resumed is not None, "the preempted request should come back with a prefix hit"
    # Its tail blocks may have been evicted first (tail-first free); the head still hits.
    assert resumed.num_computed_tokens % 4 == 0 and resumed.num_computed_tokens >= 4
    assert out.num_scheduled_tokens["new"] == len(resumed.all_token_ids) - resumed.num_computed_tokens


def test_ids_ended_before_an_empty_step_reach_the_next_step():
    """An abort (or preemption) followed by a step that schedules nothing: the runner must
    still learn of it in the next step it runs, or it keeps the request's state and block-table
    row (and sees a resumed request "new" twice). Found by tests/fuzz (seed 14)."""
    s = make()
    s.add_request(req("a", 6))
    run_step(s)
    s.abort_requests(["a"])
    assert s.schedule().is_empty  # nothing to run: the engine submits no step
    s.add_request(req("b", 3))
    out = s.schedule()
    assert out.finished_request_ids == {"a"}



def test_preempt_running_frees_every_block_and_requeues_in_order():
    """vLLM's reset_prefix_cache(reset_running_requests=True): every running request is
    preempted (oldest first in waiting again, recomputed from its tokens), so the cache can be
    emptied; a request whose step is in flight (pipeline parallelism) is left running."""
    s = make()
    for rid, start in (("a", 1), ("b", 50)):
        s.add_request(req(rid, 6, max_tokens=8, start=start))
    run_step(s)
    run_step(s)
    out = s.schedule()  # in flight, not yet updated
    assert s.preempt_running() == 0 and len(s.running) == 2
    s.update(out, sampled_tokens(s, out))
    tokens = {rid: list(s.requests[rid].all_token_ids) for rid in ("a", "b")}
    assert s.preempt_running() == 2 and not s.running
    assert s.kv.num_free_blocks == s.kv.num_blocks and s.kv.reset_prefix_cache()
    assert [r.request_id for r in s.waiting] == ["a", "b"]
    assert all(s.requests[rid].num_computed_tokens == 0 for rid in tokens)
    out = s.schedule()  # both back, recomputed over prompt + output so far
    assert {r.request_id for r in out.new_requests} == {"a", "b"}
    assert out.num_scheduled_tokens == {rid: len(t) for rid, t in tokens.items()} == {"a": 9, "b": 9}
    assert s.preempted_ids == set() and s.num_preemptions_total == 2
