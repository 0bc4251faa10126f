"""Prefix-cache affinity: which replica a request should go to. Plain Python, no Ray.

Invariants:

* Load first: only *eligible* replicas, those whose load figure is at most
  ``imbalance_threshold`` above the least one's, are preferred; so affinity can cost at most
  that much queueing, and a hot prefix spills onto other replicas instead of piling up. The
  figure is the router's (replica_load.py): the engine load score, or requests in flight.
* Among eligible replicas, the one holding the longest prefix of the request's chunk chain
  (``PrefixIndex.match``) wins; ties go to the less loaded, then to the rendezvous hash.
* A prefix no eligible replica holds goes to the rendezvous (highest-random-weight) winner of
  its *first* chunk among the eligible replicas. Every router (one per ingress replica) with
  the same replicas computes the same winner, so even a burst of requests with a new shared
  prefix, routed before any of them is recorded, lands on one replica.
* A request with no chain (short prompt, not a completion) goes to a least-loaded replica.
* LoRA multiplexing: ``holders`` are the replicas that report holding the request's adapter
  (Serve's multiplexed model ids). When some eligible replica holds it, the choice above is
  made among those holders only; when none does (a new adapter, or its holders are busy past
  the threshold), among all eligible replicas (the rendezvous winner of the adapter's link).

The answer is ranked: ``[[preferred], [the others: adapter holders first, then least loaded
first]]``. Serve tries the first rank, and the second at once if the preferred replica is full
(max_ongoing_requests).
"""

from __future__ import annotations

import hashlib
import random
from typing import Hashable, Optional

from tessellm.core.prefix_index import PrefixIndex


def rank_replicas(chain: list[int], loads: dict[Hashable, int], index: PrefixIndex,
                  imbalance_threshold: int, rng: Optional[random.Random] = None,
                  holders: frozenset = frozenset()) -> list[list]:
    """Replicas in ranks of preference; ``loads`` maps each candidate to its load figure;
    ``holders``: those holding the request's adapter (LoRA multiplexing)."""
    if not loads:
        return []
    rng = rng or random
    min_load = min(loads.values())
    eligible = [r for r, load in loads.items() if load <= min_load + imbalance_threshold]
    eligible = [r for r in eligible if r in holders] or eligible
    min_load = min(loads[r] for r in eligible)
    if not chain:
        least = [r for r in eligible if loads[r] == min_load]
        first = rng.choice(least)
    else:
        depth = index.match(chain, eligible)
        best = max(depth.values())
        if best > 0:
            deepest = [r for r in eligible if depth[r] == best]
            low = min(loads[r] for r in deepest)
            first = rendezvous_winner(chain[0], [r for r in deepest if loads[r] == low])
        else:
            first = rendezvous_winner(chain[0], eligible)
    rest = sorted((r for r in loads if r != first), key=lambda r: (r not in holders, loads[r]))
    return [[first], rest] if rest else [[first]]


def rendezvous_winner(key: int, replicas: list) -> Hashable:
    """The replica with the highest hash of (key, replica): stable, and uniform over keys."""
    def weight(replica) -> bytes:
        return hashlib.blake2b(f"{key}:{replica}".encode(), digest_size=8).digest()

    return max(replicas, key=weight)
