"""Scheduling policy (vLLM's --scheduling-policy): fcfs, or priority (lower first, then arrival;
the lowest-priority running request preempted when KV blocks run out). The scheduler without
torch, then a tiny real model through LLM / LLMEngine."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tessellm.core.block_manager import BlockManager
from tessellm.core.request import Request
from tessellm.core.request_queue import FCFSQueue, PriorityQueue, make_queue
from tessellm.core.scheduler import Scheduler, SchedulerConfig
from tests.scheduler_steps import step


def make(policy: str, num_blocks=64, max_seqs=8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, 64, 256, policy=policy), BlockManager(num_blocks, 4, True))


def req(rid: str, priority: int, arrival: float, n: int = 4, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(10 * arrival, 10 * arrival + n)), SamplingParams(max_tokens=max_tokens),
                   eos_token_ids=[0], arrival_time=arrival, priority=priority)


def test_waiting_requests_are_admitted_by_priority_then_arrival():
    s = make("priority", max_seqs=1)
    for r in (req("a", 1, 1), req("b", 0, 2), req("c", 0, 3), req("d", -2, 4)):
        s.add_request(r)
    admitted = []
    while s.has_unfinished():
        admitted += [r.request_id for r in step(s).new_requests]
    assert admitted == ["d", "b", "c", "a"]


def test_fcfs_admits_in_arrival_order_whatever_the_priority():
    s = make("fcfs", max_seqs=1)
    for r in (req("a", 1, 1), req("b", 0, 2)):
        s.add_request(r)
    admitted = []
    while s.has_unfinished():
        admitted += [r.request_id for r in step(s).new_requests]
    assert admitted == ["a", "b"]


@pytest.mark.parametrize("policy,victim", [("priority", "low"), ("fcfs", "high")])
def test_out_of_blocks_preempts_the_lowest_priority_not_the_newest(policy, victim):
    """Two 4-token prompts, 3 blocks of 4: after the prefill each needs a second block and one
    is left. Under priority the older low-priority request gives way; under fcfs the newest."""
    s = make(policy, num_blocks=3)
    s.add_request(req("low", 5, 1))
    s.add_request(req("high", 0, 2))
    step(s)
    out = step(s)
    assert out.preempted_request_ids == {victim}
    assert s.requests[victim].num_preemptions == 1
    other = ({"low", "high"} - {victim}).pop()
    assert s.requests[other].num_preemptions == 0 and out.num_scheduled_tokens == {other: 1}
    while s.has_unfinished():  # the victim resumes once the other is done
        step(s)
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_running_requests_are_served_in_priority_order():
    """A later, higher-priority request is admitted into the running list ahead of a
    lower-priority one, so the next shortage preempts the lower one (the last in order)."""
    s = make("priority")
    s.add_request(req("low", 3, 1))
    step(s)
    s.add_request(req("high", 1, 2))
    s.add_request(req("mid", 2, 3))
    step(s)
    assert [r.request_id for r in s.running] == ["high", "mid", "low"]


def test_abort_removes_a_waiting_request_from_the_heap():
    s = make("priority", max_seqs=1)
    for r in (req("a", 0, 1), req("b", 1, 2), req("c", 2, 3)):
        s.add_request(r)
    s.abort_requests(["b"])
    assert [r.request_id for r in reversed(s.waiting)] == ["c", "a"] and len(s.waiting) == 2
    admitted = []
    while s.has_unfinished():
        admitted += [r.request_id for r in step(s).new_requests]
    assert admitted == ["a", "c"]


def test_queues_and_their_policy_names():
    assert isinstance(make_queue("fcfs"), FCFSQueue) and isinstance(make_queue("priority"), PriorityQueue)
    with pytest.raises(ValueError, match="scheduling_policy 'lifo' is not supported; use fcfs"):
        make_queue("lifo")


# -- a tiny real model -------------------------------------------------------------------------

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("llama")


def _finish_order(engine, requests) -> list[str]:
    for rid, prompt, priority in requests:
        engine.add_request(rid, {"prompt_token_ids": prompt}, GREEDY, priority=priority)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    return order


def test_a_later_high_priority_request_finishes_first(path):
    llm = LLM(path, dtype="float32", scheduling_policy="priority", max_num_seqs=1)
    engine = llm.engine
    assert _finish_order(engine, [("early", [5, 6, 7], 5), ("late", [8, 9], -1)]) == ["late", "early"]
    assert _finish_order(engine, [("first", [5, 6, 7], 0), ("second", [8, 9], 0)]) == ["first", "second"]
    # LLM.generate: one priority per prompt, outputs in input order, the same greedy tokens
    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8, 9]}]
    plain = llm.generate(prompts, GREEDY, use_tqdm=False)
    ranked = llm.generate(prompts, GREEDY, use_tqdm=False, priority=[3, -3])
    assert [o.outputs[0].token_ids for o in ranked] == [o.outputs[0].token_ids for o in plain]
    with pytest.raises(ValueError, match="2 values for 1 prompts; give one priority per prompt"):
        llm.generate(prompts[:1], GREEDY, use_tqdm=False, priority=[1, 2])
    with pytest.raises(ValueError, match="priority must be an integer"):
        engine.add_request("x", {"prompt_token_ids": [1]}, GREEDY, priority=1.5)


def test_a_tiny_kv_cache_preempts_the_low_priority_request(path):
    """16-token prompts, 3 blocks of 16: both prefill, then each needs a second block and one is
    left; the older low-priority request is preempted and resumes with the same tokens."""
    llm = LLM(path, dtype="float32", scheduling_policy="priority", num_kv_blocks=3, block_size=16)
    engine, sched = llm.engine, llm.engine.core.scheduler
    roomy = llm.generate([{"prompt_token_ids": list(range(1, 17))}], GREEDY, use_tqdm=False)
    engine.add_request("low", {"prompt_token_ids": list(range(1, 17))}, GREEDY, priority=2)
    engine.add_request("high", {"prompt_token_ids": list(range(30, 46))}, GREEDY, priority=1)
    preempted, outputs = set(), {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o.outputs[0].token_ids
        preempted |= {rid for rid, r in sched.requests.items() if r.num_preemptions}
    assert preempted == {"low"}
    assert outputs["low"] == roomy[0].outputs[0].token_ids


def test_fcfs_refuses_a_priority_naming_the_flag(path):
    llm = LLM(path, dtype="float32")
    with pytest.raises(ValueError, match=r"scheduling_policy='priority' \(--scheduling-policy priority\)"):
        llm.generate([{"prompt_token_ids": [1, 2]}], GREEDY, use_tqdm=False, priority=[1])
    out = llm.generate([{"prompt_token_ids": [1, 2]}], GREEDY, use_tqdm=False, priority=[0])
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="scheduling_policy 'lifo' is not supported"):
        LLM(path, dtype="float32", scheduling_policy="lifo")


def test_priority_and_extra_args_reach_the_cores_request(path):
    """What the engine core schedules: the request's priority and SamplingParams.extra_args
    (vLLM's vllm_xargs land there), as given to add_request."""
    llm = LLM(path, dtype="float32", scheduling_policy="priority")
    params = SamplingParams(max_tokens=2, extra_args={"tenant": "blue", "tags": ["a", 1]})
    llm.engine.add_request("r", {"prompt_token_ids": [1, 2, 3]}, params, priority=7)
    core_req = llm.engine.core.scheduler.requests["r"]
    assert core_req.priority == 7 and core_req.sampling_params.extra_args == {"tenant": "blue", "tags": ["a", 1]}
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
