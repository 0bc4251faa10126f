"""The data-parallel front end's view of each core's prefix cache (``core/cache_view.py``):
the core's block manager records what enters and leaves its cache, the front end hashes a
prompt exactly as the core does, and the per-core view stays bounded. Plain Python; the
routing on real cores is in tests/distributed/test_data_parallel.py."""

from __future__ import annotations

import torch

from tessellm.core.block_manager import BlockManager
from tessellm.core.cache_view import HOST, CacheEvents, CacheView, short_hash
from tessellm.core.kv_offload import HostKVTier
from tessellm.core.engine_core import EngineCoreRequest
from tessellm.core.load_balance import request_block_hashes
from tessellm.core.prompt_embeds import PromptEmbeds
from tessellm.core.request import Request
from tessellm.core.sampling_params import SamplingParams
from tessellm.lora.request import LoRARequest
from tessellm.multimodal.inputs import MultiModalFeature

PARAMS = SamplingParams(max_tokens=1)


def _drain(events: CacheEvents) -> tuple[set, set, bool]:
    out = events.drain()
    return (set(out["added"]), set(out["removed"]), out["reset"]) if out else (set(), set(), False)


def test_events_carry_the_net_change():
    ev = CacheEvents()
    assert ev.drain() is None  # nothing changed: nothing sent
    ev.stored(1)
    ev.stored(2)
    ev.removed(2)  # stored and evicted in one interval: only the removal (harmless if unseen)
    ev.removed(3)
    ev.stored(3)  # evicted and stored again: held
    assert _drain(ev) == ({1, 3}, {2}, False)
    assert ev.drain() is None
    ev.stored(4)
    ev.cleared()  # a reset drops what came before it
    ev.stored(5)
    assert _drain(ev) == ({5}, set(), True)
    ev.stored((1 << 127) + 9)  # 128-bit hashes travel as their low 64 bits
    assert _drain(ev) == ({9}, set(), False)
    # The host tier's changes ride the same stream, in lists of their own.
    ev.removed(9)
    ev.stored(9, HOST)
    ev.stored(10, HOST)
    ev.removed(10, HOST)
    out = ev.drain()
    assert (set(out["removed"]), set(out["host_added"]), set(out["host_removed"])) == ({9}, {9}, {10})
    ev.stored(11)
    assert "host_added" not in ev.drain()  # no host change: no host lists


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, PARAMS)


def test_block_manager_reports_what_enters_and_leaves_its_cache():
    """A real block manager: published blocks are reported stored, blocks taken for another
    request are reported evicted, a reset clears; the view that applies the reports holds
    exactly the manager's cached hashes."""
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.events = CacheEvents()
    view = CacheView(1, max_entries=100)

    def sync():
        view.apply(0, bm.events.drain())
        assert set(view._cached[0]) == {short_hash(h) for h in bm.cached}

    a = _request("a", list(range(10, 22)))  # 3 full blocks
    assert bm.allocate(a, 12) is not None
    bm.publish_full_blocks(a, 12)
    sync()
    assert view.num_cached(0) == 3
    bm.free(a)  # freed but still cached
    sync()
    assert view.num_cached(0) == 3
    b = _request("b", list(range(50, 62)))  # takes three blocks: evicts two of a's (the free
    assert bm.allocate(b, 12) is not None   # queue's oldest: a's tail first) and one empty
    bm.publish_full_blocks(b, 12)
    sync()
    assert view.depths([short_hash(h) for h in a.block_hashes]) == [1]  # a's first block survives
    bm.free(b)
    assert bm.reset_prefix_cache()
    sync()
    assert view.num_cached(0) == 0


def _core_request(req: EngineCoreRequest) -> Request:
    """The core's Request for ``req``, as EngineCore.add_request builds it."""
    return Request(req.request_id, req.prompt_token_ids, req.sampling_params, (), req.arrival_time,
                   req.cache_salt, req.wait_for, LoRARequest.from_dict(req.lora_request),
                   req.mm_features, req.pooling_task, req.prompt_embeds)


def test_front_end_hashes_equal_the_cores():
    """``request_block_hashes`` (front end) gives the hashes the core's block manager computes
    for the same request: per-request salt, LoRA adapter, images and prompt embeddings in the
    keys; only the first ``max_blocks``."""
    tokens = [(3 * i) % 97 + 1 for i in range(40)]
    image = MultiModalFeature(offset=10, length=8, identifier="ab" * 16, data=b"")
    embeds = PromptEmbeds.from_tensor(torch.randn(40, 4, generator=torch.Generator().manual_seed(0)), 4, "float32")
    variants = {
        "plain": {},
        "salt": {"cache_salt": "tenant-a"},
        "lora": {"lora_request": LoRARequest("ad", 3, "/x").to_dict()},
        "salt+lora": {"cache_salt": "tenant-a", "lora_request": LoRARequest("ad", 3, "/x").to_dict()},
        "image": {"mm_features": [image]},
        "embeds": {"prompt_embeds": embeds},
    }
    seen = {}
    for name, extra in variants.items():
        req = EngineCoreRequest(name, tokens, PARAMS, 0.0, **extra)
        bm = BlockManager(num_blocks=16, block_size=8)
        core = _core_request(req)
        bm.update_block_hashes(core)
        assert request_block_hashes(req, 8) == core.block_hashes, name
        assert request_block_hashes(req, 8, max_blocks=2) == core.block_hashes[:2], name
        seen[name] = tuple(core.block_hashes)
    assert len(set(seen.values())) == len(variants)  # every key keeps prompts apart
    assert seen["image"][0] == seen["plain"][0] and seen["image"][1] != seen["plain"][1]  # from the image on
    assert request_block_hashes(EngineCoreRequest("s", tokens[:7], PARAMS, 0.0), 8) == []


def test_view_depths_in_flight_and_bound():
    view = CacheView(2, max_entries=4)
    view.apply(0, {"added": [1, 2, 3], "removed": [], "reset": False})
    assert view.depths([1, 2, 3, 4]) == [3, 0]
    assert view.depths([2, 3]) == [2, 0] and view.depths([9, 1]) == [0, 0]  # leading runs only
    # In flight: held while the request runs, gone when it is dropped (finished, aborted).
    view.hold("r1", 1, [1, 2, 7])
    view.hold("r2", 1, [1, 8])
    assert view.depths([1, 2, 7, 5]) == [2, 3]
    view.drop("r1")
    assert view.depths([1, 2, 7]) == [2, 1] and view.num_in_flight(1) == 2
    view.drop("r2")
    view.drop("r2")  # unknown: no-op
    assert view.num_in_flight(1) == 0 and view.depths([1]) == [1, 0]
    # Bounded: the least recently reported or matched go first.
    view.touch(0, [1])  # 1 was just matched: most recent
    view.apply(0, {"added": [5, 6], "removed": [3]})
    assert set(view._cached[0]) == {1, 2, 5, 6}
    view.apply(0, {"added": [7]})
    assert set(view._cached[0]) == {1, 5, 6, 7}  # 2 was the oldest
    view.apply(0, {"added": [8], "removed": [], "reset": True})
    assert set(view._cached[0]) == {8} and view.num_cached(1) == 0


def test_host_tier_reports_what_it_holds():
    """A real block manager with a host tier: blocks evicted from the device are reported
    moved to the host tier, a full tier's least recently used reported gone, a load back
    reported on the device again. The view that applies the reports holds exactly both tiers'
    hashes, and its ``tiered_depths`` of a prompt are what the block manager would match: its
    device hit (``find_cached_prefix``), then its host hit (``find_offloaded``)."""
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.host = HostKVTier(3)
    bm.events = bm.host.events = CacheEvents()
    view = CacheView(1, max_entries=100)

    def sync():
        view.apply(0, bm.events.drain())
        assert set(view._cached[0]) == {short_hash(h) for h in bm.cached}
        assert set(view._host[0]) == {short_hash(h) for h in bm.host.lru}

    def fill(rid: str, tokens: list[int]) -> Request:
        req = _request(rid, tokens)
        assert bm.allocate(req, len(tokens)) is not None
        req.num_computed_tokens = len(tokens)
        bm.publish_full_blocks(req, len(tokens))
        bm.free(req)
        sync()
        return req

    def tiers(tokens: list[int]) -> tuple[list, tuple[int, int]]:
        """The view's chain of a prompt and the (device, host) hit the core would have."""
        probe = _request("probe", tokens + [1])  # one more token: every full block may hit
        device = len(bm.find_cached_prefix(probe, count=False))
        return [short_hash(h) for h in probe.block_hashes], (device, len(bm.find_offloaded(probe, device)))

    a_tokens, b_tokens = list(range(10, 22)), list(range(50, 66))
    fill("a", a_tokens)  # 3 full blocks, device
    chain_a, hit = tiers(a_tokens)
    assert hit == (3, 0) and view.tiered_depths(chain_a) == [hit]
    fill("b", b_tokens)  # 4 blocks: evicts a's three into the host tier
    assert tiers(a_tokens)[1] == (0, 3) and view.tiered_depths(chain_a) == [(0, 3)]
    again = _request("a2", a_tokens + [1])
    offloaded = bm.find_offloaded(again, len(bm.find_cached_prefix(again)))
    assert bm.allocate(again, 1, [], offloaded) is not None  # loads a's back, evicting b's
    sync()  # into the full tier: its least recently used go
    assert view.tiered_depths(chain_a) == [(3, 0)] and view.num_cached(0, HOST) == 3
    bm.free(again)
    seen = set()
    for tokens in (b_tokens, a_tokens, list(range(70, 86)), a_tokens[:8] + [99, 98, 97, 96]):
        fill(f"r{tokens[0]}", tokens)
        for probe in (a_tokens, b_tokens):
            chain, hit = tiers(probe)
            assert view.tiered_depths(chain) == [hit], (tokens[0], probe[0])
            seen.add(hit)
    assert {(0, 3), (1, 3)} <= seen  # host only, and a device run continued from the host
    assert bm.reset_prefix_cache()
    sync()
    assert view.num_cached(0) == 0 and view.num_cached(0, HOST) == 0
