"""The engine deployment's Serve request router: prefix-cache affinity with a load check.

Serve builds one router per DeploymentHandle, in the process holding the handle: here, each
ingress replica. It calls ``initialize_state(**router kwargs)`` once, then for each request
``choose_replicas(candidates, pending_request)`` (the policy, affinity_policy.py) and, once a
replica accepted it, ``on_request_routed``; ``on_request_completed`` when it ends.

The load figure (``balance``, replica_load.py): ``load`` (default), the replica's engine load
score (``load_score``, as the data-parallel balancer's) from the figures it reports through
Serve's routing stats (``record_routing_stats`` of engine_replica.py, read here as
``RunningReplica.routing_stats``), with the requests that reached it since taking the free
slots that report showed (as running), the rest as queued;
``in_flight``, its requests in flight.

The ingress passes the prompt's chunk hashes as the ``prefix_hashes`` keyword of the handle
call (prefix_key.py), so nothing here parses a request. A request for a LoRA adapter carries
it as Serve's multiplexed model id (``handle.options(multiplexed_model_id=...)``); the replicas
that report it loaded (``RunningReplica.multiplexed_model_ids``, pushed by their
``serve.multiplexed`` loader) are preferred (affinity_policy.py). A request's load figure is Serve's
queue-length cache for the replica (what the replica last reported, plus what this router
sent since) or this router's own count of the requests it sent there and that have not
completed, whichever is larger: a probe's or a rejection's answer (the replica's count when
it answered) resets the cache and misses requests still on their way there. With the ``load``
balance, the requests chosen for a replica and not yet sent count too (claims, below), and
the score is computed on top (replica_load.py).

Claims: Serve routes concurrent requests in tasks of their own, so a burst is chosen before
any of it is sent and counted. Each choice claims its replica for its request until the send
(``on_send_request``, matched to the request whose future Serve fulfilled with that replica),
moves with the request when Serve fulfils it with another rank's replica, and ends with the
request if it is cancelled or completes unsent. No timer ends a claim that is still pending:
on a busy machine the send may come seconds after the choice.
Chains in flight: a named request's chain counts at the replica it was sent to from its send
to its completion (as its send count, ``_routed``); a new prompt's leading links in flight at a
replica are blocks held there, which it shares rather than takes from the free ones
(``shared_tokens``, replica_load.py), so a prefix's holder is not scored as if the prompt
needed its whole KV anew.
This class reads those through the ``RequestRouter`` API of Ray Serve >= 2.50 (tested: 2.60).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from tessellm.entrypoints.ray_serve.affinity_policy import rank_replicas
from tessellm.entrypoints.ray_serve.replica_load import BALANCES, replica_score, replica_speeds, threshold
from tessellm.core.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)

ROUTER_CLASS_PATH = "tessellm.entrypoints.ray_serve.prefix_router:PrefixAffinityRouter"
_CLAIM_MAX_S = 60.0  # a claim outlives no request: this only bounds one Serve never settles


@dataclass
class _Claim:
    """A request chosen for a replica and not yet sent (module docstring, Claims)."""

    uid: str  # the replica chosen first
    since: float
    request: PendingRequest
    named: bool  # keyed by the request's internal id (its completion will name it)

    def target(self) -> Optional[str]:
        """The replica the request will be sent to: the one Serve fulfilled its future with
        (another rank's, if the chosen one was full), else the chosen one; None once it will not
        be sent (cancelled, failed)."""
        future = self.request.future
        if not future.done():
            return self.uid
        if future.cancelled() or future.exception() is not None:
            return None
        replica = future.result()
        replica_id = getattr(replica, "replica_id", None)
        return getattr(replica_id, "unique_id", None)


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, prefix_affinity: bool = True, imbalance_threshold: int = 8,
                         max_entries_per_replica: int = 50_000, balance: str = "in_flight",
                         chunk_tokens: int = 32, **_unused) -> None:
        """``balance``: the load figure (module docstring; "in_flight" when not given, as before
        it existed); ``chunk_tokens``: prompt tokens per prefix chunk, to estimate a prompt's
        length. ``_unused``: other options that travel in the same dict."""
        if balance not in BALANCES:
            raise ValueError(f"router balance {balance!r} is not supported; use one of {BALANCES}.")
        self._affinity = prefix_affinity
        self._threshold = imbalance_threshold
        self._balance = balance
        self._chunk_tokens = chunk_tokens
        self._index = PrefixIndex(max_entries_per_replica)
        self._sent: Counter = Counter()  # replica unique id -> this router's requests sent, not completed
        # (internal request id, replica unique id) -> its sends there not completed: a request
        # Serve retries after a rejection is sent twice, and the rejected send's completion may
        # come after the retry's send (Serve's cancel is an RPC)
        self._routed: Counter = Counter()
        self._unnamed: Counter = Counter()  # replica unique id -> sent requests with no claim to name them
        self._known: frozenset = frozenset()
        self._claims: dict[str, _Claim] = {}  # internal request id -> its claim (counted by ``load``)
        # Chains in flight: (internal request id, replica unique id) -> the chains of its sends
        # there not completed (as ``_routed``), and replica unique id -> Counter of their links
        # (the prompt blocks its requests hold: shared by a new prompt, not taken; replica_load.py)
        self._chains: dict[tuple, list] = {}
        self._live: dict[str, Counter] = {}
        self._claim_ids = itertools.count()  # keys for requests that carry no id

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # no busy loop when all are full
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        self._forget_gone(by_id)
        request_id = _request_id(pending_request)
        self._claims.pop(request_id, None)  # a retry: its earlier choice is not load elsewhere
        chain = _chain(pending_request)
        loads = self.replica_loads(candidate_replicas, len(chain) * self._chunk_tokens,
                                   _samples(pending_request), chain)
        chain = chain if self._affinity else []
        model_id = _model_id(pending_request)
        holders = frozenset(uid for uid, r in by_id.items()
                            if model_id and model_id in r.multiplexed_model_ids)
        slack = threshold(self._threshold, min(loads.values(), default=0), self._balance)
        ranks = rank_replicas(chain, loads, self._index, slack, holders=holders)
        if chain and ranks:
            self._index.record(ranks[0][0], chain)  # claim it now: a burst agrees before routing ends
        if ranks and pending_request is not None:  # (``in_flight`` does not count them: it names sends)
            key = request_id or f"_{next(self._claim_ids)}"
            self._claims[key] = _Claim(ranks[0][0], time.monotonic(), pending_request, bool(request_id))
        return [[by_id[uid] for uid in rank] for rank in ranks]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        """Serve sent a request there: it counts as sent, no longer as claimed."""
        super().on_send_request(replica_id)
        uid = replica_id.unique_id
        key = self._sent_claim(uid)
        claim = self._claims.pop(key) if key is not None else None
        if claim is not None and claim.named:
            self._routed[key, uid] += 1
            self._hold(key, uid, _chain(claim.request))
        else:
            self._unnamed[uid] += 1
        self._sent[uid] += 1

    def _sent_claim(self, uid: str) -> Optional[str]:
        """The claim of the request just sent to ``uid``: the oldest whose future Serve fulfilled
        with that replica; else (a send Serve made without fulfilling a future first) the oldest
        pending one there."""
        fulfilled, pending = None, None
        for key, claim in self._claims.items():  # in the order they were made
            if claim.request.future.done():
                if fulfilled is None and claim.target() == uid:
                    fulfilled = key
            elif pending is None and claim.uid == uid:
                pending = key
        return fulfilled if fulfilled is not None else pending

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        chain = _chain(pending_request) if self._affinity else []
        if chain:
            self._index.record(replica_id.unique_id, chain)  # where it really went (the second rank, if the first was full)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """A request Serve sent to ``replica_id`` ended, or one chosen for it ended unsent (its
        send raised; a reservation's request). Only that replica's count drops: a request
        rejected there and retried elsewhere completes once for each."""
        uid = replica_id.unique_id
        if self._routed.get((internal_request_id, uid), 0) > 0:
            _decrement(self._routed, (internal_request_id, uid))
            self._release((internal_request_id, uid))
        else:
            claim = self._claims.get(internal_request_id)
            if claim is not None and claim.request.future.done() and claim.target() == uid:
                del self._claims[internal_request_id]  # it ended before its send
                return
            if self._unnamed.get(uid, 0) <= 0:
                return
            _decrement(self._unnamed, uid)
        _decrement(self._sent, uid)

    def replica_loads(self, replicas: list[RunningReplica], num_prompt_tokens: int,
                      num_samples: int = 1, chain: Optional[list] = None) -> dict[str, int]:
        """Each replica's load figure (unique id -> figure; ``balance``, replica_load.py) for a
        prompt of about ``num_prompt_tokens`` running ``num_samples`` sequences, whose prefix
        chain is ``chain`` (its leading links in flight at a replica: blocks held there)."""
        claimed = self._claimed()
        if self._balance == "in_flight":
            return {r.replica_id.unique_id: self._ongoing(r) for r in replicas}
        ongoing = {r.replica_id.unique_id: self._ongoing(r) + claimed.get(r.replica_id.unique_id, 0)
                   for r in replicas}
        reports = [_routing_stats(r) for r in replicas]
        return {r.replica_id.unique_id: replica_score(report, ongoing[r.replica_id.unique_id],
                                                      num_prompt_tokens, num_samples, speed,
                                                      self._shared_tokens(r.replica_id.unique_id, chain))
                for r, report, speed in zip(replicas, reports, replica_speeds(reports))}

    def _shared_tokens(self, uid: str, chain: Optional[list]) -> int:
        """The prompt's leading tokens (``chunk_tokens`` a link) that requests in flight at
        ``uid`` share: their KV blocks are held there already."""
        live, n = self._live.get(uid), 0
        if live and chain:
            while n < len(chain) and live.get(chain[n], 0) > 0:
                n += 1
        return n * self._chunk_tokens

    def _hold(self, key: str, uid: str, chain: list) -> None:
        """A named request sent to ``uid``: its chain is in flight there until its completion."""
        if chain:
            self._chains.setdefault((key, uid), []).append(chain)
            self._live.setdefault(uid, Counter()).update(chain)

    def _release(self, send: tuple) -> None:
        """One send of a request completed: its chain no longer in flight at that replica."""
        chains = self._chains.get(send)
        if not chains:
            return
        chain = chains.pop()
        if not chains:
            del self._chains[send]
        live = self._live.get(send[1])
        if live is not None:
            live.subtract(chain)
            for h in [h for h in chain if live[h] <= 0]:
                del live[h]

    def _ongoing(self, replica: RunningReplica) -> int:
        """The replica's requests now (module docstring): Serve's queue-length cache or this
        router's requests sent there, whichever is larger."""
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        sent = self._sent.get(replica.replica_id.unique_id, 0)
        return sent if cached is None else max(cached, sent)

    def _claimed(self) -> Counter:
        """Replica unique id -> the requests chosen for it and not yet sent; drops the claims of
        requests that will not be sent."""
        counts: Counter = Counter()
        oldest = time.monotonic() - _CLAIM_MAX_S
        for key, claim in list(self._claims.items()):
            target = claim.target() if claim.since >= oldest else None
            if target is None:
                del self._claims[key]
            else:
                counts[target] += 1
        return counts

    def _forget_gone(self, by_id: dict) -> None:
        """Drops what this router holds for replicas no longer among the candidates: their index
        entries and in-flight counts (a killed replica's requests may never report completion)."""
        ids = frozenset(by_id)
        if ids != self._known:
            self._index.retain(ids)
            for counts in (self._sent, self._unnamed):
                for uid in [u for u in counts if u not in ids]:
                    del counts[uid]
            self._claims = {key: c for key, c in self._claims.items() if c.target() in ids}
            self._routed = Counter({key: n for key, n in self._routed.items() if key[1] in ids})
            self._chains = {key: c for key, c in self._chains.items() if key[1] in ids}
            self._live = {uid: live for uid, live in self._live.items() if uid in ids}
            self._known = ids


def _decrement(counts: Counter, key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


def _routing_stats(replica: RunningReplica) -> dict:
    """The replica's latest load report (``record_routing_stats``); {} before its first."""
    stats = getattr(replica, "routing_stats", None)
    return stats if isinstance(stats, dict) else {}


def _request_id(pending_request: Optional[PendingRequest]) -> Optional[str]:
    """The request's internal id (Serve's, unique per request); None for none."""
    if pending_request is None:
        return None
    return getattr(pending_request.metadata, "internal_request_id", None) or None


def _chain(pending_request: Optional[PendingRequest]) -> list[int]:
    if pending_request is None:
        return []
    chain = pending_request.kwargs.get("prefix_hashes")
    return list(chain) if isinstance(chain, (list, tuple)) else []


def _samples(pending_request: Optional[PendingRequest]) -> int:
    """The sequences the request runs (the ingress's ``num_samples``, prefix_key.route_info)."""
    n = pending_request.kwargs.get("num_samples", 1) if pending_request is not None else 1
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def _model_id(pending_request: Optional[PendingRequest]) -> str:
    """The request's multiplexed model id (its LoRA adapter), "" for none."""
    if pending_request is None:
        return ""
    return getattr(pending_request.metadata, "multiplexed_model_id", "") or ""
