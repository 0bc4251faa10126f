"""A core's step time for the data-parallel balancer (``core/load_report.StepTimer``): a step is
timed when its result comes back, from its launch or the result before it, whichever is later.
Under async scheduling a call that only launches a step returns at once: timing the calls
averaged those launch-only calls in (a step time well under the device's)."""

from __future__ import annotations

import os
import time

import pytest

from tessellm import LLM, SamplingParams
from tessellm.core.engine_process import _CoreLoop
from tessellm.core.load_report import StepTimer


def _samples(timer: StepTimer, calls) -> list:
    seen = []
    timer.record = seen.append
    for call in calls:
        timer.step(*call)
    return seen


def test_steps_are_timed_from_launch_or_the_result_before_to_their_result():
    # sync: each call launches a step and waits for it; idle gaps between calls never count
    assert _samples(StepTimer(), [(0.0, 0.010, True, 0), (5.0, 5.012, True, 0),
                                  (6.0, 6.001, False, 0)]) == [pytest.approx(0.010),
                                                               pytest.approx(0.012)]
    # async: A launched alone (the call returns at once), then B launched as A comes back, C
    # as B does; the last call launches nothing and waits for C. 10 ms a step on the device.
    calls = [(0.0, 0.0005, True, 1), (0.0006, 0.0101, True, 1), (0.0102, 0.0201, True, 1),
             (0.0202, 0.0301, False, 0)]
    assert _samples(StepTimer(), calls) == [pytest.approx(0.0101), pytest.approx(0.0100),
                                            pytest.approx(0.0100)]
    # a call whose empty schedule still waits for a step in flight records that step
    assert _samples(StepTimer(), [(0.0, 0.001, True, 1), (0.002, 0.015, False, 0)]) == [
        pytest.approx(0.015)]


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_the_core_loop_times_each_step_once_its_result_is_back(tiny_model_dir, async_scheduling):
    """The engine core's loop (``_CoreLoop._step``) on a real engine whose device takes 100 ms
    a step (each wait for a result sleeps that long; the cpu forward itself runs in the launch, a
    few ms): one time per step whose result came
    back, none for a call that only launched one, and the average is the device's 100 ms
    or more (the launch-only calls pulled it under)."""
    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", seed=0, block_size=4,
              num_kv_blocks=64, max_num_batched_tokens=32, async_scheduling=async_scheduling)
    core = llm.engine.core
    assert core.async_scheduling is async_scheduling
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)  # first-use costs
    collect, collected = core.executor.collect, []

    def slow_collect(*args):
        time.sleep(0.1)
        collected.append(1)
        return collect(*args)

    core.executor.collect = slow_collect
    for i, prompt in enumerate([[5, 17, 42, 99], [7, 7, 7], [300, 12, 1, 2, 3]]):
        llm.engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    loop = _CoreLoop(core, None, None, os.getpid())
    times, record = [], loop.step_timer.record
    loop.step_timer.record = lambda s: (times.append(s), record(s))
    while core.has_unfinished_requests():
        loop._step()
    assert len(times) == len(collected) >= 10
    assert min(times) >= 0.1 and loop.step_timer.ms >= 100
    llm.shutdown()
