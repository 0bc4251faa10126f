"""What each data-parallel engine core's prefix cache holds, as the front end sees it.

Two halves, plain Python:

* ``CacheEvents`` (in a core): the block manager notes every block hash that enters its prefix
  cache (``stored``: a full block published, or loaded from the host tier) or leaves it
  (``removed``: the block was evicted for reuse; ``cleared``: the whole cache was reset), and
  the host tier (``kv_offload.HostKVTier``, ``--kv-offloading-size``) does the same for its
  own residency, with ``tier=HOST``: a block evicted from the device is stored there, a full
  tier drops its least recently used. The core's stats message drains the net change since
  the last one (``drain``) and carries it to the front end with the load figures it already
  sends (after a call that changed the cache, a reset for sleep mode or new weights, the core
  sends one at once rather than at its next step): no extra message, a few bytes per
  block (vLLM's KV cache events, piggybacked; theirs carry a medium too).
* ``CacheView`` (in the front end, for ``load_balance.LoadBalancer``): per core, the hashes its
  reports say it holds on the device and in the host tier, plus the chains of the requests in
  flight there (sent, not finished: their blocks are being computed and cannot be evicted
  while they run), so a burst sharing a new prefix gathers on one core before its first
  report. ``tiered_depths`` says, per core, how many leading links of a prompt's chain it
  holds on the device, and how many more after those in the host tier: what its block manager
  would match (``find_cached_prefix``, then ``find_offloaded`` from where that stops)::

      chain:        h0   h1   h2   h3   h4   h5
      device view:  h0   h1             h4          device run 2 (h0 h1)
      host view:           h1   h2   h3             host run 2 after it (h2 h3; h4: not host)

  A host-tier hit is loaded back (PCIe copy) instead of recomputed: cheaper than a miss, dearer
  than a device hit (load_balance.py weighs it).

Hashes are ``block_manager.hash_block``'s, cut to their low 64 bits (``short_hash``; msgpack
carries at most 64-bit integers): the front end hashes a prompt's blocks as the core does
(``load_balance.iter_request_block_hashes``: the same token ids, cache salt, LoRA adapter, images
and prompt embeddings in the key), so a hash it computes is the one the core reports. A
collision in 64 bits costs at most a misrouted request, never a wrong KV read (the core
matches on its own 128-bit hashes).

Invariants:

* ``drain`` returns, per tier, disjoint added / removed lists whose effect on a view that
  applied every earlier drain is the core's net change in that tier: a hash stored then
  evicted within one interval is only removed, one evicted then stored again only added (the
  last event wins). ``reset`` comes first: the view forgets that core's hashes (both tiers: a
  reset clears the host tier too), then applies the rest. The device tier's lists are
  ``added`` / ``removed``; the host tier's ``host_added`` / ``host_removed``, present only
  when it changed.
* The view is bounded: at most ``max_entries`` reported hashes per core and tier, least
  recently reported-or-matched dropped first (the core's own caches also evict their least
  recently used blocks first), and in flight only the chains of the requests in flight.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Optional

_MASK64 = (1 << 64) - 1
DEVICE = 0  # a tier: the device's KV cache (the block manager's prefix cache)
HOST = 1  # the host tier (kv_offload.HostKVTier)
_KEYS = (("added", "removed"), ("host_added", "host_removed"))  # drain's lists, per tier


def short_hash(block_hash: int) -> int:
    """The low 64 bits of a block hash: what the reports and the view carry."""
    return block_hash & _MASK64


class CacheEvents:
    """A core's prefix-cache changes since the last ``drain``, per tier (module docstring)."""

    def __init__(self):
        self._added: tuple[set[int], set[int]] = (set(), set())  # per tier
        self._removed: tuple[set[int], set[int]] = (set(), set())
        self._reset = False

    def stored(self, block_hash: int, tier: int = DEVICE) -> None:
        h = short_hash(block_hash)
        self._removed[tier].discard(h)
        self._added[tier].add(h)

    def removed(self, block_hash: int, tier: int = DEVICE) -> None:
        h = short_hash(block_hash)
        self._added[tier].discard(h)
        self._removed[tier].add(h)

    def cleared(self) -> None:
        """The whole prefix cache was reset, the host tier's too."""
        for tier in (DEVICE, HOST):
            self._added[tier].clear()
            self._removed[tier].clear()
        self._reset = True

    @property
    def changed(self) -> bool:
        return bool(self._reset or any(self._added) or any(self._removed))

    def drain(self) -> Optional[dict]:
        """The net change as a message part (``CacheView.apply``), None when there is none."""
        if not self.changed:
            return None
        out = {"added": list(self._added[DEVICE]), "removed": list(self._removed[DEVICE]),
               "reset": self._reset}
        if self._added[HOST] or self._removed[HOST]:
            out["host_added"], out["host_removed"] = list(self._added[HOST]), list(self._removed[HOST])
        self._added, self._removed, self._reset = (set(), set()), (set(), set()), False
        return out


class CacheView:
    """Per core, the chain links it holds (module docstring). A link is a short block hash or
    any other hashable the balancer puts in a chain (its LoRA adapter link)."""

    def __init__(self, num_cores: int, max_entries: int):
        self.max_entries = max_entries
        self._cached: list[OrderedDict] = [OrderedDict() for _ in range(num_cores)]  # reported
        self._host: list[OrderedDict] = [OrderedDict() for _ in range(num_cores)]  # host tier
        self._flight: list[dict[Hashable, int]] = [{} for _ in range(num_cores)]  # link -> requests
        self._chains: dict[str, tuple[int, list]] = {}  # request id -> (core, chain) in flight

    # -- reports ------------------------------------------------------------------------------

    def apply(self, core: int, events: Optional[dict]) -> None:
        """A core's ``CacheEvents.drain`` from its latest stats message."""
        if not events:
            return
        if events.get("reset"):
            self._cached[core].clear()
            self._host[core].clear()
        for tier, (added, removed) in zip((self._cached[core], self._host[core]), _KEYS):
            for h in events.get(removed, ()):
                tier.pop(h, None)
            for h in events.get(added, ()):
                tier[h] = None
                tier.move_to_end(h)
            while len(tier) > self.max_entries:
                tier.popitem(last=False)

    def remember(self, core: int, link: Hashable) -> None:
        """Count ``link`` as held by ``core`` until it ages out (no core reports it: the
        balancer's own guesses, e.g. that an adapter stays loaded where it ran)."""
        self.apply(core, {"added": [link]})

    # -- requests in flight -------------------------------------------------------------------

    def hold(self, request_id: str, core: int, chain: list) -> None:
        """``request_id`` (prompt chain ``chain``) was sent to ``core``."""
        if not chain:
            return
        self.drop(request_id)
        flight = self._flight[core]
        for link in chain:
            flight[link] = flight.get(link, 0) + 1
        self._chains[request_id] = (core, chain)

    def drop(self, request_id: str) -> None:
        """``request_id`` finished, was aborted or rejected (no-op if unknown)."""
        entry = self._chains.pop(request_id, None)
        if entry is None:
            return
        core, chain = entry
        flight = self._flight[core]
        for link in chain:
            left = flight[link] - 1
            if left:
                flight[link] = left
            else:
                del flight[link]

    # -- queries ------------------------------------------------------------------------------

    def depths(self, chain: list) -> list[int]:
        """Per core, how many leading links of ``chain`` it holds on the device (reported or in
        flight)."""
        return [d for d, _ in self.tiered_depths(chain)]

    def tiered_depths(self, chain: list) -> list[tuple[int, int]]:
        """Per core, ``(device, host)``: the leading links of ``chain`` it holds on the device
        (reported or in flight), and how many links after those its host tier holds (module
        docstring's picture)."""
        out = []
        for cached, flight, host in zip(self._cached, self._flight, self._host):
            n = 0
            while n < len(chain) and (chain[n] in cached or chain[n] in flight):
                n += 1
            m = n
            while m < len(chain) and chain[m] in host:
                m += 1
            out.append((n, m - n))
        return out

    def holds(self, core: int, link: Hashable, tier: int = DEVICE) -> bool:
        if tier == HOST:
            return link in self._host[core]
        return link in self._cached[core] or link in self._flight[core]

    def touch(self, core: int, links: list) -> None:
        """``links`` (a chain's matched head) were just used on ``core``: most recent now, as
        the core's LRU sees a prefix hit (a host hit too: it is loaded, which touches it)."""
        for tier in (self._cached[core], self._host[core]):
            for link in links:
                if link in tier:
                    tier.move_to_end(link)

    def num_cached(self, core: int, tier: int = DEVICE) -> int:
        return len(self._host[core] if tier == HOST else self._cached[core])

    def num_in_flight(self, core: int) -> int:
        return len(self._flight[core])
