"""Which replica (Ray Serve) probably holds which prompt prefix: the router's memory, plain
Python. (The data-parallel balancer reads its cores' own reports instead: ``cache_view.py``.)

For each replica, the chunk hashes (``entrypoints/ray_serve/prefix_key.py``) of the prompts
recently sent to it, in an LRU of bounded size, standing in for that
replica's KV prefix cache (which also evicts least recently used blocks first). Invariant: ``match`` counts, per replica, how many *leading*
hashes of a chain it holds, stopping at the first miss, so a hit at depth k means the first k
chunks were all sent there recently.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable


class PrefixIndex:
    def __init__(self, max_entries_per_replica: int):
        self.max_entries = max_entries_per_replica
        self._lru: dict[Hashable, OrderedDict] = {}

    def record(self, replica: Hashable, chain: list[int]) -> None:
        """Remember that ``chain`` was sent to ``replica`` (most recently used now)."""
        lru = self._lru.setdefault(replica, OrderedDict())
        for h in chain:
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.max_entries:
            lru.popitem(last=False)

    def match(self, chain: list[int], replicas: Iterable[Hashable]) -> dict[Hashable, int]:
        """Per replica, how many leading hashes of ``chain`` it holds (0 when none)."""
        out = {}
        for replica in replicas:
            lru = self._lru.get(replica)
            n = 0
            if lru:
                while n < len(chain) and chain[n] in lru:
                    n += 1
            out[replica] = n
        return out

    def retain(self, replicas: Iterable[Hashable]) -> None:
        """Forget replicas that are gone (a replacement starts with an empty cache)."""
        keep = set(replicas)
        for replica in [r for r in self._lru if r not in keep]:
            del self._lru[replica]

    def num_entries(self, replica: Hashable) -> int:
        return len(self._lru.get(replica, ()))
