"""Async scheduling: step N+1 is scheduled and launched before step N's tokens reach the host.

Everything a request produces must be exactly what the synchronous engine produces: greedy and
seeded tokens, stops (tokens, max_tokens, min_tokens), penalties (which need every token on the
host), logprobs, chunked prefill and preemption (a request preempted while its step runs is
recomputed). Real engines on a tiny random Llama on the CPU, where the code path is the same as
on a GPU (the device feed of pending tokens included) but runs synchronously.
"""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tessellm.core.block_manager import BlockManager
from tessellm.core.request import Request
from tessellm.core.scheduler import Scheduler, SchedulerConfig

PROMPTS = [[5, 17, 42, 99, 3, 250], [7, 7, 7], list(range(40, 110)), [300, 12], list(range(200, 233))]


def _engine(path: str, async_scheduling: bool, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 64)
    # Small steps: long prompts are chunked, so prefill chunks are also scheduled ahead.
    return LLM(path, device="cpu", dtype="float32", seed=0, block_size=4,
               max_num_batched_tokens=32, async_scheduling=async_scheduling, **kw)


class _Logprobs(list):
    """Per token, the sorted (id, logprob) pairs; equal with ids exact and values within 1e-4
    (batches are composed differently, so float32 sums differ in the last bits)."""

    def __eq__(self, other):
        return len(self) == len(other) and all(
            [t for t, _ in a] == [t for t, _ in b] and
            all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b)) for a, b in zip(self, other))


def _run(llm: LLM, params) -> list:
    """Per request: tokens, finish reason and logprobs."""
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason,
             _Logprobs(sorted((t, lp.logprob) for t, lp in e.items())
                       for e in o.outputs[0].logprobs or []))
            for o in outs]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    path = tiny_model_dir("llama-sharp")
    sync, asyn = _engine(path, False), _engine(path, True)
    assert not sync.engine.core.async_scheduling and asyn.engine.core.async_scheduling
    yield sync, asyn
    sync.shutdown()
    asyn.shutdown()


def _mixed_params(stop_ids: list[int]) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=stop_ids),
        SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=40, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, min_tokens=5,
                       stop_token_ids=stop_ids),
    ]


def test_async_matches_sync(engines):
    sync, asyn = engines
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    baseline = _run(sync, greedy)
    assert _run(asyn, greedy) == baseline
    # Stop on a token the third request produces at its 4th step (and the fifth at its 2nd,
    # masked there by min_tokens): the step already scheduled ahead of the stop is dropped.
    stop_ids = [baseline[2][0][3], baseline[4][0][1]]
    params = _mixed_params(stop_ids)
    expected = _run(sync, params)
    assert expected[2][1] == "stop" and len(expected[2][0]) == 4
    assert _run(asyn, params) == expected


def test_async_penalties_match_sync(engines):
    """Penalties count every output token on the host: such a step waits for the one before."""
    sync, asyn = engines
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, presence_penalty=0.8,
                            frequency_penalty=0.5, repetition_penalty=1.3)
    assert _run(asyn, params) == _run(sync, params)


def test_async_overlaps_steps(engines):
    """Step N+1 is launched before step N resolves; decode inputs come from the device."""
    _, asyn = engines
    runner = asyn.engine.core.runner
    events, fed = [], []
    steps = runner.steps  # the runner's step pipeline: launched steps, resolve, device feed
    launch, resolve, feed = runner.execute_async, steps.resolve, steps.apply_feed
    runner.execute_async = lambda sched: (events.append("launch"), launch(sched))[1]
    steps.resolve = lambda handle: (events.append("resolve"), resolve(handle))[1]
    steps.apply_feed = lambda ids, rows, staging: (fed.append(len(rows)), feed(ids, rows, staging))[1]
    try:
        asyn.generate([{"prompt_token_ids": [5, 6, 7]}],
                      SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)
    finally:
        del runner.execute_async, steps.resolve, steps.apply_feed
    # 6 forward passes for 6 tokens (none wasted: max_tokens is known ahead), each launched
    # before the previous one resolved.
    assert events == ["launch", "launch", "resolve"] * 1 + ["launch", "resolve"] * 4 + ["resolve"]
    assert sum(fed) == 5  # every decode input was a token only the device had seen yet


def test_async_preemption_matches_sync(tiny_model_dir):
    path = tiny_model_dir("llama-sharp")
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    results = []
    for mode in (False, True):
        llm = _engine(path, mode, num_kv_blocks=40)  # 160 tokens for ~200 needed: preempts
        try:
            results.append(_run(llm, params))
            assert llm.engine.core.scheduler.num_preemptions_total > 0
        finally:
            llm.shutdown()
    assert results[1] == results[0]


def _scheduler(num_blocks: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                                     async_scheduling=True), BlockManager(num_blocks, 4))


def test_scheduler_schedules_one_step_ahead():
    sch = _scheduler()
    req = Request("a", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    sch.add_request(req)
    s1 = sch.schedule()  # the prompt; samples
    s2 = sch.schedule()  # ahead: one decode token at position 3, its id a placeholder
    assert s2.num_scheduled_tokens == {"a": 1} and s2.cached_requests[0].num_computed_tokens == 3
    assert sch.schedule().is_empty  # never two steps ahead
    assert (sch.in_flight.tokens_ahead("a"), sch.in_flight.samples_ahead("a")) == (4, 2)
    sch.update(s1, {"a": [10]})
    s3 = sch.schedule()  # outputs 1 + 1 pending < 3
    assert s3.num_scheduled_tokens == {"a": 1} and s3.cached_requests[0].num_computed_tokens == 4
    sch.update(s2, {"a": [11]})
    assert sch.schedule().is_empty  # 2 outputs + 1 pending reach max_tokens: nothing ahead
    out = sch.update(s3, {"a": [12]})
    assert out[0].finish_reason == "length" and req.output_token_ids == [10, 11, 12]


def test_scheduler_drops_results_of_a_preempted_step():
    sch = _scheduler(num_blocks=3)  # 12 tokens
    a = Request("a", list(range(4)), SamplingParams(max_tokens=8, ignore_eos=True))
    b = Request("b", list(range(7)), SamplingParams(max_tokens=8, ignore_eos=True))
    sch.add_request(a)
    sch.add_request(b)
    s1 = sch.schedule()  # a: 4 tokens (1 block), b: 7 (2 blocks); all blocks held
    assert s1.num_scheduled_tokens == {"a": 4, "b": 7}
    s2 = sch.schedule()  # a needs a 2nd block: b, in flight, is preempted
    assert s2.num_preempted == 1 and s2.num_scheduled_tokens == {"a": 1}
    assert "b" in s2.preempted_request_ids and b.num_computed_tokens == 0
    outs = sch.update(s1, {"a": [50], "b": [60]})
    assert [o.request_id for o in outs] == ["a"]  # b's token is dropped: it is recomputed
    assert b.output_token_ids == [] and b in sch.waiting
    sch.update(s2, {"a": [51]})
    assert a.output_token_ids == [50, 51] and a.num_computed_tokens == 5
