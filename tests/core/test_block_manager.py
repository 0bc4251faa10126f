"""Block manager without torch: allocation, freeing, prefix hits, eviction order."""

from __future__ import annotations

import subprocess
import sys

from tessellm.core.block_manager import BlockManager
from tessellm.core.request import Request
from tessellm.core.sampling_params import SamplingParams


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams())


def test_core_scheduling_imports_no_torch():
    code = ("import sys, tessellm.core.scheduler, tessellm.core.block_manager; "
            "assert 'torch' not in sys.modules, 'scheduler pulled in torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_and_free_returns_every_block():
    kv = BlockManager(num_blocks=8, block_size=4)
    r = req("a", list(range(10)))
    ids = kv.allocate(r, 10)
    assert len(ids) == 3 and len(set(ids)) == 3
    assert kv.num_free_blocks == 5
    r.num_computed_tokens = 10
    assert kv.allocate(r, 2) == []  # 12 tokens still fit in 3 blocks
    assert kv.allocate(r, 3) is not None and len(kv.block_ids("a")) == 4
    kv.free(r)
    assert kv.num_free_blocks == 8 and kv.usage == 0.0


def test_allocation_fails_cleanly_when_full():
    kv = BlockManager(num_blocks=2, block_size=4)
    r = req("a", list(range(12)))
    assert kv.allocate(r, 12) is None
    assert kv.num_free_blocks == 2 and kv.block_ids("a") == []


def test_prefix_hit_shares_blocks_and_leaves_last_token():
    kv = BlockManager(num_blocks=16, block_size=4)
    a = req("a", list(range(12)))
    kv.allocate(a, 12)
    kv.publish_full_blocks(a, 12)
    b = req("b", list(range(12)))  # identical prompt
    hit = kv.find_cached_prefix(b)
    assert len(hit) == 2, "the last block holds the last prompt token, which must be recomputed"
    ids = kv.allocate(b, 4, hit)
    assert ids[:2] == kv.block_ids("a")[:2]
    assert kv.blocks[ids[0]].ref_cnt == 2
    assert kv.stats.hits == 8 and kv.stats.queries == 12


def test_different_prefix_or_salt_does_not_hit():
    kv = BlockManager(num_blocks=16, block_size=4)
    a = req("a", list(range(12)))
    kv.allocate(a, 12)
    kv.publish_full_blocks(a, 12)
    assert kv.find_cached_prefix(req("b", [99] + list(range(1, 12)))) == []
    salted = Request("c", list(range(12)), SamplingParams(), cache_salt="tenant-2")
    assert kv.find_cached_prefix(salted) == []


def test_block_hashes_are_collision_resistant_and_the_same_in_every_process():
    """Prefix hashes are BLAKE2b, not Python's hash(): distinct keys Python's hash() equates
    (hash(-1) == hash(-2): a tuple hash of small ints is as easy to collide by construction)
    stay distinct, and a salted prompt's hashes are equal in two interpreters (str and None
    hash per process)."""
    from tessellm.core.block_manager import hash_block

    assert hash((None, (1, 2), -1)) == hash((None, (1, 2), -2))
    assert hash_block(None, (1, 2), -1) != hash_block(None, (1, 2), -2)
    assert hash_block(None, (1, 2)) != hash_block(None, (1,), 2)
    code = ("from tessellm.core.block_manager import BlockManager; from tessellm.core.request import "
            "Request; from tessellm.core.sampling_params import SamplingParams; "
            "r = Request('a', list(range(12)), SamplingParams(), cache_salt='t'); "
            "BlockManager(8, 4).update_block_hashes(r); print(r.block_hashes)")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)}
    assert len(runs) == 1 and len(eval(runs.pop())) == 3


def test_freed_cached_block_is_revived_then_evicted_lru():
    kv = BlockManager(num_blocks=4, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    kv.allocate(a, 5)
    kv.publish_full_blocks(a, 5)
    kv.free(a)
    assert kv.num_free_blocks == 4 and len(kv.cached) == 2
    # Revived by a hit: leaves the free queue.
    b = req("b", [1, 2, 3, 4, 9])
    hit = kv.find_cached_prefix(b)
    assert len(hit) == 2
    kv.allocate(b, 1, hit)
    assert kv.num_free_blocks == 1
    kv.free(b)
    # a's tail block was freed first, so it is evicted before the prefix blocks.
    c = req("c", [7, 7])
    kv.allocate(c, 2)
    assert len(kv.cached) == 2, "an uncached free block is taken before cached ones"
    d = req("d", [8, 8, 8, 8])
    kv.allocate(d, 4)
    assert len(kv.cached) == 1 and kv.find_cached_prefix(req("e", [1, 2, 3])) != []


def test_prefix_caching_disabled_never_hits():
    kv = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = req("a", list(range(12)))
    kv.allocate(a, 12)
    kv.publish_full_blocks(a, 12)
    assert kv.find_cached_prefix(req("b", list(range(12)))) == []


def test_truncate_frees_the_tail_and_keeps_shared_prefix_blocks():
    kv = BlockManager(num_blocks=16, block_size=4)
    a = req("a", list(range(9)))
    kv.allocate(a, 9)
    a.num_computed_tokens = 9
    kv.publish_full_blocks(a, 9)  # blocks 0-1 (tokens 0..7) published
    b = req("b", list(range(9)))
    hit = kv.find_cached_prefix(b)
    kv.allocate(b, 1, hit)
    b.num_computed_tokens = 8
    # b computes 1 known token + 7 drafts (tokens 8..15): one more block; 2 drafts accepted.
    assert len(kv.allocate(b, 8)) == 1 and len(kv.block_ids("b")) == 4
    free_before = kv.num_free_blocks
    freed = kv.truncate(b, 11)
    assert len(freed) == 1 and kv.num_free_blocks == free_before + 1
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert [kv.blocks[i].ref_cnt for i in kv.block_ids("b")] == [2, 2, 1]
    # Nothing unaccepted reached the prefix cache: only a's two published blocks are there.
    assert len(kv.cached) == 2 and kv.blocks[freed[0]].block_hash is None
    assert kv.truncate(b, 12) == [] and len(kv.block_ids("b")) == 3


def test_truncate_refuses_published_tokens_and_preemption_frees_the_rest():
    kv = BlockManager(num_blocks=8, block_size=4)
    a = req("a", list(range(10)))
    kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.publish_full_blocks(a, 10)
    try:
        kv.truncate(a, 6)
    except ValueError as exc:
        assert "published in the prefix cache" in str(exc)
    else:
        raise AssertionError("truncating published tokens must fail")
    kv.allocate(a, 6)  # 16 tokens: 4 blocks
    assert kv.truncate(a, 10) != [] and len(kv.block_ids("a")) == 3
    kv.free(a)  # preemption: every block back, the published count reset for a fresh start
    assert kv.num_free_blocks == 8 and a.num_published_blocks == 0 and len(kv.cached) == 2
