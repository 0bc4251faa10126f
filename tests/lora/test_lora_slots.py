"""The scheduler's adapter slots, without a model: a step never holds more distinct adapters
than slots, requests wait (never fail) for a slot or a loading adapter, and all complete."""

from __future__ import annotations

from tessellm.core.block_manager import BlockManager
from tessellm.core.request import Request
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.scheduler import Scheduler, SchedulerConfig
from tessellm.lora.request import LoRARequest
from tessellm.lora.slots import LoRASlots
from tests.scheduler_steps import sampled_tokens


class HostCache:
    """Stands in for AdapterStore's bookkeeping (the scheduler reads only these four calls);
    adapters become ready when the test says so, as the loader thread would."""

    def __init__(self):
        self.loaded, self.requested, self.failed = set(), [], {}

    def ensure(self, lora):
        if lora.lora_int_id not in self.requested:
            self.requested.append(lora.lora_int_id)

    def ready(self, key):
        return key in self.loaded

    def error(self, key):
        return self.failed.get(key)

    def evict(self, key):
        self.loaded.discard(key)


def _scheduler(num_slots: int, cache: HostCache) -> Scheduler:
    s = Scheduler(SchedulerConfig(8, 64, 256), BlockManager(64, 4, True))
    s.lora = LoRASlots(num_slots, cache)
    return s


def _run(s: Scheduler):
    """One step; also each scheduled request's adapter id (read before update ends any)."""
    out = s.schedule()
    ids = {rid: s.requests[rid].lora_request.lora_int_id for rid in out.lora_slots}
    out.adapter_ids = ids
    return out, s.update(out, sampled_tokens(s, out))


def test_slot_pressure_waits_and_completes():
    cache = HostCache()
    s = _scheduler(2, cache)
    loras = [LoRARequest(f"a{i}", i + 1, f"/adapters/{i}") for i in range(4)]
    for i in range(12):
        s.add_request(Request(f"r{i}", [1 + i, 2, 3, 4, 5], SamplingParams(max_tokens=3),
                              lora_request=loras[i % 4] if i % 3 else None))
    out, _ = _run(s)  # nothing loaded yet: only base-model requests run
    assert all(s.requests[r].lora_request is None for r in out.num_scheduled_tokens)
    assert sorted(cache.requested) == [1, 2, 3, 4]  # every adapter is being read meanwhile
    cache.loaded = {1, 2, 3, 4}
    loaded_slots, done = [], set()
    for _ in range(40):
        out, outs = _run(s)
        assert len(set(out.adapter_ids.values())) <= 2 and set(out.lora_slots.values()) <= {0, 1}
        for rid, slot in out.lora_slots.items():  # the slot holds that request's adapter
            assert s.lora.slot_ids[slot] == out.adapter_ids[rid]
        loaded_slots += [slot for slot, _ in out.lora_loads]
        done |= {o.request_id for o in outs if o.finish_reason}
        if not s.has_unfinished():
            break
    assert done == {f"r{i}" for i in range(12)}
    assert len(loaded_slots) >= 4 and s.lora.users == [0, 0]


def test_failed_adapter_aborts_only_its_requests():
    cache = HostCache()
    cache.failed[9] = "LoRA adapter 'x' uses DoRA"
    s = _scheduler(1, cache)
    s.add_request(Request("bad", [1, 2, 3], SamplingParams(max_tokens=2),
                          lora_request=LoRARequest("x", 9, "/x")))
    s.add_request(Request("ok", [1, 2, 3], SamplingParams(max_tokens=2)))
    out, _ = _run(s)
    ended = s.take_finished_outputs()
    assert [(o.request_id, o.finish_reason) for o in ended] == [("bad", "abort")]
    assert "DoRA" in ended[0].stop_reason and list(out.num_scheduled_tokens) == ["ok"]


def test_loads_wait_for_a_step_that_runs():
    """A slot given out while building a step that ends up empty (the only running request is
    in flight, no blocks are free) is loaded by the next step that reaches the runner."""
    cache = HostCache()
    cache.loaded = {1}
    s = Scheduler(SchedulerConfig(8, 64, 256, async_scheduling=True), BlockManager(2, 4, True))
    s.lora = LoRASlots(1, cache)
    s.add_request(Request("big", list(range(1, 8)), SamplingParams(max_tokens=1)))
    first = s.schedule()  # "big" takes both blocks and stays in flight
    s.add_request(Request("r", [1, 2, 3], SamplingParams(max_tokens=1),
                          lora_request=LoRARequest("a", 1, "/a")))
    empty = s.schedule()  # "r" is given slot 0 but no blocks: nothing runs
    assert empty.is_empty and empty.lora_loads == []
    s.update(first, {"big": [7]})  # "big" finishes, its blocks are free
    out = s.schedule()
    assert out.lora_slots == {"r": 0} and [slot for slot, _ in out.lora_loads] == [0]


def test_dropped_adapter_leaves_its_slot_once_its_requests_finish():
    """``drop`` (the server unloaded the adapter): while a request still runs with it, the slot
    keeps it and the request finishes; then the slot is free and the host copy evicted; an
    adapter no request uses goes at once."""
    cache = HostCache()
    cache.loaded |= {1, 2}
    s = _scheduler(2, cache)
    a, b = LoRARequest("a", 1, "/adapters/a"), LoRARequest("b", 2, "/adapters/b")
    s.add_request(Request("ra", [1, 2, 3], SamplingParams(max_tokens=3), lora_request=a))
    _run(s)
    assert s.lora.slot_ids.count(1) == 1
    assert s.lora.drop(1) is False  # ra still runs with it
    assert 1 in s.lora.slot_ids and 1 in cache.loaded
    while s.has_unfinished():
        _run(s)
    assert 1 not in s.lora.slot_ids and 1 not in cache.loaded
    s.add_request(Request("rb", [1, 2, 3], SamplingParams(max_tokens=1), lora_request=b))
    _run(s)
    assert s.lora.drop(2) is True and 2 not in s.lora.slot_ids and 2 not in cache.loaded


def test_dropped_adapter_reaches_the_workers_with_the_next_step():
    """A dropped adapter's id goes to the worker processes (``lora_unloads``) once its last
    request lets go, with the next step only; an announcement not sent yet is withdrawn; an
    adapter named again after the drop is announced again, in the same step as its unload."""
    cache = HostCache()
    cache.loaded |= {1, 2}
    s = _scheduler(2, cache)
    a, b = LoRARequest("a", 1, "/adapters/a"), LoRARequest("b", 2, "/adapters/b")
    s.lora.announce(a)
    s.add_request(Request("ra", [1, 2, 3], SamplingParams(max_tokens=2), lora_request=a))
    out, _ = _run(s)
    assert out.lora_prefetch == [a.to_dict()] and out.lora_unloads == []
    s.lora.drop(1)  # ra still runs with it
    out, _ = _run(s)
    assert out.lora_unloads == [] and not s.has_unfinished()
    s.add_request(Request("base", [4, 5], SamplingParams(max_tokens=1)))
    out, _ = _run(s)
    assert out.lora_unloads == [1]
    s.lora.announce(b)
    s.lora.drop(2)  # before any step announced it: the workers never read it
    s.lora.announce(a)  # named again: read again after the unload
    s.lora.drop(1)
    s.lora.announce(a)
    s.add_request(Request("base2", [4, 5], SamplingParams(max_tokens=1)))
    out, _ = _run(s)
    assert out.lora_unloads == [2, 1] and out.lora_prefetch == [a.to_dict()]


def test_waiting_adapter_is_not_overtaken_forever():
    """One slot, held by adapter A, and a steady stream of new A requests; a B request arrives
    after the first A: it gets the slot once the A requests admitted before it finish (A
    requests arriving after it wait for it), and it completes. Base-model requests are not
    held back by the drain. Without draining, new A requests kept the slot busy and B never ran."""
    cache = HostCache()
    cache.loaded |= {1, 2}
    s = _scheduler(1, cache)
    a, b = LoRARequest("a", 1, "/adapters/a"), LoRARequest("b", 2, "/adapters/b")
    s.add_request(Request("a0", [1, 2, 3], SamplingParams(max_tokens=4), lora_request=a))
    _run(s)
    s.add_request(Request("b", [4, 5, 6], SamplingParams(max_tokens=2), lora_request=b))
    b_steps, base_ran = None, []
    for step in range(1, 40):  # a new A request and a base request every step
        s.add_request(Request(f"a{step}", [1, 2, 3], SamplingParams(max_tokens=4), lora_request=a))
        s.add_request(Request(f"base{step}", [7, 8], SamplingParams(max_tokens=1)))
        out, _ = _run(s)
        base_ran.append(f"base{step}" in out.num_scheduled_tokens)
        if b_steps is None and "b" in out.num_scheduled_tokens:
            b_steps = step
    assert b_steps is not None and b_steps <= 4, b_steps  # a0's 3 remaining tokens, then b
    assert all(base_ran[:b_steps]), base_ran  # never held back for the drain
    while s.has_unfinished():
        _run(s)
    assert s.lora.users == [0]
