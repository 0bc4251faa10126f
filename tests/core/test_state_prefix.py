"""Prefix caching for recurrent-state models, without torch (core/state_prefix.py): prefill
chunks end on block boundaries, snapshots are reserved there and published with their blocks,
hits end at a snapshot, and snapshots leave with their blocks or to the pool's LRU."""

from __future__ import annotations

import pytest

from tessellm.core.block_manager import BlockManager
from tessellm.core.scheduler import Scheduler, SchedulerConfig
from tessellm.core.state_prefix import StateSnapshots, align_chunk, saves_at, saves_within
from tests.core.test_scheduler import req
from tests.scheduler_steps import run_step


def make(num_blocks=64, budget=64, snapshots=8, block_size=4, within=False):
    """``within``: saves inside a prefill step (the default scheduling); False: the older one,
    a chunk cut at each boundary it saves at (``StateSnapshots.within``)."""
    kv = BlockManager(num_blocks, block_size, True)
    kv.states = StateSnapshots(snapshots)
    kv.states.within = within
    return Scheduler(SchedulerConfig(8, budget, 256), kv)


def finish(s: Scheduler, rid: str):
    while rid in s.requests:
        run_step(s)


def check_pool(kv: BlockManager) -> None:
    """Every slot is free, pending on a block, or published on a cached block; none twice."""
    states = kv.states
    held = [b for b in kv.blocks if b.state_slot is not None]
    slots = [b.state_slot for b in held] + states.free
    assert sorted(slots) == list(range(states.num_slots))
    for slot, block in states.published.items():
        assert block.state_slot == slot and kv.cached.get(block.block_hash) is block
    for block in held:
        assert block.state_slot in states.published or block.block_hash is None


@pytest.mark.parametrize("start,num_new,num_tokens,want", [
    (0, 11, 11, 8),  # the whole prompt: first up to the last boundary a hit may end at
    (8, 3, 11, 3),  # then the tail
    (0, 12, 12, 8),  # a prompt of whole blocks: the last token is never a hit
    (0, 3, 3, 3),  # shorter than a block: nothing to cut
    (0, 6, 20, 4),  # a chunk before the end: rounded down to a boundary
    (5, 2, 20, 2),  # ... unless that leaves nothing
    (10, 1, 11, 1),  # a decode
])
def test_align_chunk(start, num_new, num_tokens, want):
    assert align_chunk(start, num_new, num_tokens, 4) == want


def test_saves_only_at_boundaries_a_hit_may_end_at():
    assert saves_at(0, 8, 11, 4) == 1
    assert saves_at(8, 3, 11, 4) is None  # the tail ends off a boundary
    assert saves_at(0, 12, 12, 4) is None  # past the last boundary a hit may end at (8)
    assert saves_at(4, 4, 20, 4) == 1


def test_prompt_saves_at_its_last_boundary_and_a_longer_prompt_starts_there():
    s = make()
    s.add_request(req("a", 11))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 8}  # cut at the last boundary (8 of 11)
    assert out.state_saves == {"a": 0} and not out.state_restores
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 3} and not out.state_saves
    finish(s, "a")
    check_pool(s.kv)
    # and its decode step that filled block 2 (tokens 8 .. 11) saved there: the first to go
    assert list(s.kv.states.published) == [1, 0]

    s.add_request(req("b", 15))  # a's 11 prompt tokens, then more: hit up to a's snapshot
    out, _ = run_step(s)
    assert out.state_restores == {"b": 0}
    assert out.new_requests[0].num_computed_tokens == 8
    assert out.num_scheduled_tokens == {"b": 4}  # 8 .. 12, the last boundary of 15 tokens
    assert out.state_saves == {"b": 2}
    assert s.kv.stats.hits == 8 and s.kv.states.num_restored == 1
    check_pool(s.kv)


def test_a_hit_is_cut_back_to_the_last_block_with_a_snapshot():
    s = make(budget=4)  # chunks of one block: a snapshot after each
    s.add_request(req("a", 14))
    chunks = []
    while s.requests["a"].num_output_tokens == 0:
        out, _ = run_step(s)
        chunks.append((out.num_scheduled_tokens["a"], out.state_saves.get("a")))
    assert chunks == [(4, 0), (4, 1), (4, 2), (2, None)]
    finish(s, "a")
    # Drop the snapshot of block 1 (ends at 8): a hit covering blocks 0 .. 1 ends at block 0.
    block1 = s.kv.cached[_hash_of(s, 14, 1)]
    s.kv.states.release(block1)
    s.add_request(req("b", 10))  # shares a's first 10 tokens: KV hit of 2 blocks (8 tokens)
    out, _ = run_step(s)
    assert out.new_requests[0].num_computed_tokens == 4 and out.state_restores == {"b": 0}
    check_pool(s.kv)


def _hash_of(s: Scheduler, n: int, index: int) -> int:
    """The hash of block ``index`` of the prompt ``req(_, n)``."""
    probe = req("probe", n)
    s.kv.update_block_hashes(probe)
    return probe.block_hashes[index]


def test_a_full_pool_gives_the_least_recently_used_snapshot_and_never_a_pending_one():
    s = make(snapshots=2)
    for i, rid in enumerate("abc"):
        s.add_request(req(rid, 9, start=100 * (i + 1)))
        finish(s, rid)
    # a's decode snapshot (after 12) went first, to b's prompt; b's decode found no free slot
    # (a decode save takes none from others); then a's prompt snapshot went to c; b's stays
    assert s.kv.find_cached_prefix(req("x", 9, start=100), count=False) == []
    assert len(s.kv.find_cached_prefix(req("y", 9, start=200), count=False)) == 2
    check_pool(s.kv)
    assert s.kv.states.stats_dict() == dict(slots=2, used=2, saves=4, restores=0, evictions=2)
    # Two prompts in one step reserve both slots: a third finds none free, none published.
    s2 = make(snapshots=2)
    for i, rid in enumerate("def"):
        s2.add_request(req(rid, 9, start=100 * (i + 1)))
    out, _ = run_step(s2)
    assert sorted(out.state_saves) == ["d", "e"] and len(set(out.state_saves.values())) == 2
    check_pool(s2.kv)


def test_a_snapshot_leaves_with_its_evicted_block_and_with_a_preempted_request():
    s = make(num_blocks=4, snapshots=4)
    s.add_request(req("a", 9))
    finish(s, "a")
    assert len(s.kv.states.published) == 2  # after its prompt's 8 tokens and its decode's 12
    s.add_request(req("b", 13, start=100))  # needs every block: a's cached ones are evicted
    run_step(s)
    assert s.kv.find_cached_prefix(req("x", 9), count=False) == []
    check_pool(s.kv)
    # a's 2 snapshots left with its blocks; b's step holds a pending one (after its 12 tokens)
    assert s.kv.states.stats_dict() == dict(slots=4, used=1, saves=3, restores=0, evictions=2)
    # b's pending snapshot (its step never came back) is freed with its blocks.
    s2 = make(snapshots=4)
    s2.add_request(req("c", 9))
    out = s2.schedule()
    assert out.state_saves == {"c": 0}
    s2._preempt(s2.running.pop())
    assert s2.kv.states.num_free == 4
    check_pool(s2.kv)
    assert s2.kv.states.num_evicted == 0  # pending, never published: not counted as evicted


@pytest.mark.parametrize("setting,match", [
    (dict(kv_offloading_size=1.0), "KV offloading"),
    (dict(kv_transfer_config={"kv_connector": "SharedStorageConnector"}), "a KV connector"),
])
def test_tiers_without_snapshots_are_refused(setting, match):
    """The host tier and KV connectors move KV blocks, not state snapshots: refused."""
    from types import SimpleNamespace

    from tessellm.config import EngineArgs
    from tessellm.models.state_space import check_engine_args

    config = SimpleNamespace(architectures=["Qwen3NextForCausalLM"])
    with pytest.raises(ValueError, match=f"support {match} yet.*recurrent-state snapshots"):
        check_engine_args(EngineArgs(**setting), config)


def test_a_shared_prefix_gains_a_snapshot_where_a_second_prompt_leaves_it():
    """A = S + a keeps its state after 12 (past S's 2 full blocks); B = S + b hits S's blocks
    with no snapshot in them, so its first chunk ends where they end (8) and saves there; C =
    S + c then hits all 8 tokens, starting from B's snapshot (held by A's cached block)."""
    from tessellm.core.request import Request
    from tessellm.core.sampling_params import SamplingParams

    def prompt(rid, tail):
        return Request(rid, list(range(1, 11)) + tail, SamplingParams(max_tokens=2), eos_token_ids=[0])

    s = make()
    s.add_request(prompt("a", [50, 51, 52, 53, 54]))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 12} and out.state_saves == {"a": 0}
    finish(s, "a")
    s.add_request(prompt("b", [60, 61, 62, 63, 64]))
    out, _ = run_step(s)
    assert out.new_requests[0].num_computed_tokens == 0 and not out.state_restores
    assert out.num_scheduled_tokens == {"b": 8} and out.state_saves == {"b": 2}  # 1: a's decode
    finish(s, "b")
    check_pool(s.kv)
    s.add_request(prompt("c", [70, 71, 72, 73, 74]))
    out, _ = run_step(s)
    assert out.new_requests[0].num_computed_tokens == 8 and out.state_restores == {"c": 2}
    check_pool(s.kv)


def test_data_parallel_cores_add_up_their_snapshot_pools():
    from tessellm.metrics.stats import EngineStats, merge_engine_stats

    a = dict(slots=4, used=3, saves=7, restores=2, evictions=1)
    b = dict(slots=4, used=1, saves=1, restores=0, evictions=0)
    merged = merge_engine_stats([EngineStats(state_snapshots=a), EngineStats(state_snapshots=b)])
    assert merged.state_snapshots == dict(slots=8, used=4, saves=8, restores=2, evictions=1)
    assert merge_engine_stats([EngineStats(), EngineStats()]).state_snapshots is None


@pytest.mark.parametrize("start,num_new,num_tokens,every,want", [
    (0, 64, 45, 2, 8),  # stops at every 2 blocks (8 tokens) ...
    (8, 64, 45, 2, 8),
    (40, 64, 45, 2, 4),  # ... and the last boundary a hit may end at (44) as before
    (0, 64, 45, 3, 12),
    (2, 64, 45, 1, 2),  # a chunk starting inside a block (after a hit) ends at the next boundary
    (0, 6, 45, 2, 4),  # a chunk ending before the stop is aligned as without
    (44, 1, 45, 1, 1),  # the prompt's tail (and a decode) is never cut
])
def test_align_chunk_every_n_blocks(start, num_new, num_tokens, every, want):
    assert align_chunk(start, num_new, num_tokens, 4, every) == want


def test_a_shared_prefix_hits_from_its_second_request_with_an_interval():
    """recurrent_state_snapshot_interval=2 (blocks): A = S + a is prefilled in chunks ending at
    8 and 12, keeping the state at both; B = S + b then hits S's first 8 tokens (its KV blocks
    end at 8 and a snapshot is kept there) instead of computing S whole."""
    from tessellm.core.request import Request
    from tessellm.core.sampling_params import SamplingParams

    def prompt(rid, tail):
        return Request(rid, list(range(1, 11)) + tail, SamplingParams(max_tokens=2), eos_token_ids=[0])

    s = make()
    s.kv.states.every = 2
    s.add_request(prompt("a", [50, 51, 52, 53, 54]))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 8} and out.state_saves == {"a": 0}
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 4} and out.state_saves == {"a": 1}
    finish(s, "a")
    s.add_request(prompt("b", [60, 61, 62, 63, 64]))
    out, _ = run_step(s)
    assert out.new_requests[0].num_computed_tokens == 8 and out.state_restores == {"b": 0}
    check_pool(s.kv)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_a_bad_snapshot_interval_is_refused(bad):
    from tessellm.config import EngineArgs

    with pytest.raises(ValueError, match="recurrent_state_snapshot_interval must be an integer >= 0"):
        EngineArgs(recurrent_state_snapshot_interval=bad).validate()


def test_speculation_keeps_a_snapshot_only_past_accepted_tokens():
    """Speculative decoding (state_saves_if_accepted): a verify step that crosses a block
    boundary in its middle reserves a snapshot there; a rejected draft before it gives the slot
    back (never published), the next verify step crossing it again keeps it as the request's
    rolling decode snapshot, published with its block."""
    from tessellm.core.step import ModelRunnerOutput

    kv = BlockManager(64, 4, True)
    kv.states = StateSnapshots(8)
    s = Scheduler(SchedulerConfig(8, 64, 256, num_speculative_tokens=3), kv)
    s.add_request(req("a", 9, max_tokens=20))
    while s.requests["a"].num_output_tokens == 0:
        run_step(s)  # the prompt: 0 .. 8 (a snapshot after 8), then token 9 sampled
    a = s.requests["a"]
    assert a.num_computed_tokens == 9 and list(kv.states.published) == [0]
    a.spec_token_ids = [20, 21, 22]
    out = s.schedule()  # verify [t9 d0 d1 d2]: tokens 9 .. 12, boundary 12 after d1
    assert out.num_scheduled_tokens == {"a": 4} and not out.state_saves
    assert out.state_saves_if_accepted == {"a": [[12, 1]]}
    assert kv.req_blocks["a"][2].state_slot == 1 and kv.states.num_free == 6
    # ... counted only once a step keeps it: the total never goes down (a Prometheus counter
    # fed its differences would count a decrease as a restart: every save again)
    assert kv.states.num_saved == 1
    s.update(out, ModelRunnerOutput({"a": [20, 30]}, spec_token_ids={"a": [31, 32, 33]}))
    assert a.num_computed_tokens == 11  # t9 and d0 kept, d1 rejected: the state at 12 goes
    assert kv.req_blocks["a"][2].state_slot is None and kv.states.num_free == 7
    assert "a" not in kv.rolling and kv.states.num_saved == 1
    out = s.schedule()  # verify [t11 d0 d1 d2]: tokens 11 .. 14, boundary 12 after t11
    assert out.state_saves_if_accepted == {"a": [[12, 1]]}
    s.update(out, ModelRunnerOutput({"a": [40]}, spec_token_ids={"a": []}))  # all rejected
    assert a.num_computed_tokens == 12 and kv.rolling["a"] is kv.req_blocks["a"][2]
    assert list(kv.states.published) == [1, 0]  # the decode snapshot: the first to go
    assert kv.states.num_saved == 2
    check_pool(kv)


@pytest.mark.parametrize("start,num_new,num_tokens,every,cut,want", [
    (0, 11, 11, 0, 0, [8]),  # the last boundary a hit may end at, inside the whole prompt
    (0, 12, 12, 0, 0, [8]),  # never past it (the last token is never a hit)
    (0, 8, 11, 0, 0, []),  # the chunk's end is saves_at's
    (0, 11, 11, 1, 0, [4, 8]),  # every block
    (4, 16, 30, 2, 0, [8, 16]),  # every 2 blocks from 4: 8 and 16 (20 is the chunk's end)
    (0, 20, 20, 0, 8, [8, 16]),  # where the request's cached KV blocks end (state_cut)
    (0, 3, 3, 0, 0, []),  # shorter than a block
])
def test_saves_within(start, num_new, num_tokens, every, cut, want):
    assert saves_within(start, num_new, num_tokens, 4, every, cut) == want


def test_saves_inside_the_step_need_no_cut():
    """A prompt runs in one step, its state after its last full block saved inside it; a
    longer prompt hits there and runs its rest in one step too (not up to its own last full
    block, then the tail)."""
    s = make(within=True)
    s.add_request(req("a", 11))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 11}
    assert out.state_saves_within == {"a": [[8, 0]]} and not out.state_saves
    finish(s, "a")
    check_pool(s.kv)
    s.add_request(req("b", 15))  # a's 11 prompt tokens, then more
    out, _ = run_step(s)
    assert out.state_restores == {"b": 0} and out.new_requests[0].num_computed_tokens == 8
    assert out.num_scheduled_tokens == {"b": 7}  # 8 .. 15 in one step, saving after 12
    assert [n for n, _ in out.state_saves_within["b"]] == [12]
    finish(s, "b")
    check_pool(s.kv)


def test_saves_inside_the_step_at_the_interval_and_at_a_shared_prefix_end():
    s = make(within=True)
    s.kv.states.every = 2
    s.add_request(req("a", 21))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 21}
    assert [n for n, _ in out.state_saves_within["a"]] == [8, 16, 20]
    finish(s, "a")
    check_pool(s.kv)
    s.kv.states.every = 0
    s.add_request(req("b", 19))  # a's first 19 tokens: KV hit of 4 blocks, snapshots at 8, 16
    out, _ = run_step(s)
    assert out.new_requests[0].num_computed_tokens == 16 and out.num_scheduled_tokens == {"b": 3}
    finish(s, "b")
    s2 = make(within=True)
    s2.add_request(req("a", 21))
    finish(s2, "a")  # saves after 20 only
    s2.add_request(req("c", 19))  # KV hit of 16 tokens, no snapshot in it: computed whole,
    out, _ = run_step(s2)  # saving where those blocks end (16) inside its one step
    assert out.new_requests[0].num_computed_tokens == 0 and out.num_scheduled_tokens == {"c": 19}
    assert [n for n, _ in out.state_saves_within["c"]] == [16]
    finish(s2, "c")
    check_pool(s2.kv)
