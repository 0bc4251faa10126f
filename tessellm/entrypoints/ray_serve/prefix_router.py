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
sent since) when it is fresh, else this router's own count of its requests in flight there;
the ``load`` balance scores on top of it (replica_load.py).
This class reads those through the ``RequestRouter`` API of Ray Serve >= 2.50 (tested: 2.60).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict, deque
from typing import Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from tessellm.entrypoints.ray_serve.affinity_policy import rank_replicas
from tessellm.entrypoints.ray_serve.replica_load import BALANCES, replica_score, replica_speeds, threshold
from tessellm.core.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)

ROUTER_CLASS_PATH = "tessellm.entrypoints.ray_serve.prefix_router:PrefixAffinityRouter"
_CLAIM_S = 1.0  # how long a choice not followed by a send there still counts (load balance)


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
        self._in_flight: Counter = Counter()  # replica unique id -> this router's requests there
        self._routed: dict[str, str] = {}  # internal request id -> replica unique id
        self._known: frozenset = frozenset()
        # replica unique id -> when this router chose it first for a request not yet sent: Serve
        # routes concurrent requests in tasks of their own, so a burst is chosen before any of
        # it is sent and counted. ``load`` counts these claims too, each until a send there or
        # for _CLAIM_S (one that went to another rank).
        self._claims: defaultdict = defaultdict(deque)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # no busy loop when all are full
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        self._forget_gone(by_id)
        chain = _chain(pending_request)
        loads = self.replica_loads(candidate_replicas, len(chain) * self._chunk_tokens,
                                   _samples(pending_request))
        chain = chain if self._affinity else []
        model_id = _model_id(pending_request)
        holders = frozenset(uid for uid, r in by_id.items()
                            if model_id and model_id in r.multiplexed_model_ids)
        slack = threshold(self._threshold, min(loads.values(), default=0), self._balance)
        ranks = rank_replicas(chain, loads, self._index, slack, holders=holders)
        if chain and ranks:
            self._index.record(ranks[0][0], chain)  # claim it now: a burst agrees before routing ends
        if ranks and self._balance == "load":
            self._claims[ranks[0][0]].append(time.monotonic())
        return [[by_id[uid] for uid in rank] for rank in ranks]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        """Serve sent a request there (its queue-length cache counts it now): one claim less."""
        super().on_send_request(replica_id)
        claims = self._claims.get(replica_id.unique_id)
        if claims:
            claims.popleft()

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        uid = replica_id.unique_id
        chain = _chain(pending_request) if self._affinity else []
        if chain:
            self._index.record(uid, chain)  # where it really went (the second rank, if the first was full)
        request_id = pending_request.metadata.internal_request_id
        if request_id not in self._routed:
            self._routed[request_id] = uid
            self._in_flight[uid] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        uid = self._routed.pop(internal_request_id, None)
        if uid is not None:
            self._in_flight[uid] -= 1
            if self._in_flight[uid] <= 0:
                del self._in_flight[uid]

    def replica_loads(self, replicas: list[RunningReplica], num_prompt_tokens: int,
                      num_samples: int = 1) -> dict[str, int]:
        """Each replica's load figure (unique id -> figure; ``balance``, replica_load.py) for a
        prompt of about ``num_prompt_tokens`` running ``num_samples`` sequences."""
        if self._balance == "in_flight":
            return {r.replica_id.unique_id: self._ongoing(r) for r in replicas}
        reports = [_routing_stats(r) for r in replicas]
        return {r.replica_id.unique_id: replica_score(report, self._ongoing(r), num_prompt_tokens,
                                                      num_samples, speed)
                for r, report, speed in zip(replicas, reports, replica_speeds(reports))}

    def _ongoing(self, replica: RunningReplica) -> int:
        """The replica's requests now: Serve's queue-length cache when fresh, else this router's
        count; with ``load``, plus the requests chosen for it and not yet sent."""
        uid = replica.replica_id.unique_id
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        ongoing = cached if cached is not None else self._in_flight.get(uid, 0)
        claims = self._claims.get(uid)
        if claims:
            stale = time.monotonic() - _CLAIM_S
            while claims and claims[0] < stale:
                claims.popleft()
            ongoing += len(claims)
        return ongoing

    def _forget_gone(self, by_id: dict) -> None:
        """Drops what this router holds for replicas no longer among the candidates: their index
        entries and in-flight counts (a killed replica's requests may never report completion)."""
        ids = frozenset(by_id)
        if ids != self._known:
            self._index.retain(ids)
            for uid in [u for u in self._in_flight if u not in ids]:
                del self._in_flight[uid]
            for uid in [u for u in self._claims if u not in ids]:
                del self._claims[uid]
            self._routed = {rid: uid for rid, uid in self._routed.items() if uid in ids}
            self._known = ids


def _routing_stats(replica: RunningReplica) -> dict:
    """The replica's latest load report (``record_routing_stats``); {} before its first."""
    stats = getattr(replica, "routing_stats", None)
    return stats if isinstance(stats, dict) else {}


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
