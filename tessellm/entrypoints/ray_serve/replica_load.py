"""An engine replica's load, as the request router weighs it. Plain Python, no Ray.

Two figures (``router.balance``):

* ``load`` (default): the engine's own figures, the same score as the in-process
  data-parallel balancer's ``--data-parallel-balance load`` (core/load_report.py,
  ``load_score``; the policy in core/load_balance.py)::

      queued = waiting + arrivals since its report beyond its free slots + prefill steps ahead
      score  = 4 * queued + running + (1 if the request would start at once there else 4)

  Each replica reports (``record_routing_stats``, Serve's routing-stats API; Serve's
  controller asks every ``router.load_report_period_s`` and pushes the answer to every router
  as ``RunningReplica.routing_stats``) its engine's ``core_load`` figures: waiting and running
  requests, free request slots (``max_num_seqs``) and KV blocks, and the whole steps of prompt
  still to prefill, together with ``in_flight``, the requests the replica held when it asked.
  A report is up to a period old, so the change since is added: the replica's requests now
  (Serve's queue-length view of it, which counts every router's requests, or this router's
  own count of those it sent there, whichever is larger; plus the requests this router chose
  for it and has not sent yet, prefix_router.py) minus the engine's waiting and running ones of the report
  (not the replica's ``in_flight``: a request still in the replica's front end, not yet in its
  engine, counts as arrived). Arrivals take the free
  request slots the report showed, as running, unless requests were already waiting there;
  the rest count as queued. Departures free slots, for the waiting first. Waiting requests
  the report's free slots and KV blocks could take (at the new prompt's size) count as
  running: held back by a step's token budget, they start within a step or two, and a
  snapshot of that a second old is no queue (the prefix benchmark lost over a third of its
  cache hits to such snapshots). (The data-parallel
  balancer counts the requests sent since a core's report as queued, except at a core holding
  the prompt's prefix with room for them (``_holder_parts``), but its reports are a
  step old, these a second: a burst of short requests would spread for nothing, and a hot
  prefix lose its replica's cache.) So a burst with a hot prefix stays on the prefix's replica
  while it has slots, and spills once it would queue. "At once": nothing queued, a free
  request slot and free KV blocks for the prompt (its length estimated from its prefix chain:
  ``chunk_tokens`` tokens a chunk; the arrivals' KV is not estimated). A replica that has not
  reported yet counts as idle with room for anything, its requests now running.

  Samples: the engine counts sequences (a request with ``n`` > 1, or a batch of prompts, is
  several; ``prefix_key.route_info``), the routers count requests. The replica reports the
  sequences its requests in flight run (``in_flight_samples``), and the requests now are
  scaled up by the extra sequences of the report's (as far as they are still there), so a
  replica running one n = 8 request is not taken for one that freed seven slots. The request
  being routed adds its own samples (``load_score``: each counts and needs a slot; they share
  the prompt's blocks). Prefix sharing: the waiting requests' KV need is the engine's own
  count (``waiting_kv_blocks``: a prompt block they share with a running request or with each
  other counted once) rather than the new prompt's size times their number. The new prompt's
  own need counts only the blocks not already held there: its leading chunks that requests
  this router sent to the replica, not yet completed, share (``shared_tokens``: their blocks
  are the running requests', not among the free ones; prefix_router.py keeps the chains in
  flight per replica). A prefix only cached there (its blocks free, reusable) still counts:
  the report's free blocks include those, and the prompt takes them.
* ``in_flight``: requests in flight at the replica (Serve's queue-length view, or this
  router's own count, whichever is larger): the router before engine load reports. Blind to what only the engine
  knows: a queue behind a full batch or a full KV cache, a long prefill.

Speed (opt-in, ``TESSELLM_BALANCE_BY_STEP_TIME=1``): a replica's report carries its engine's step time (``core_load``'s ``step_ms``, a moving
average of its busy steps' wall time); the work ahead in its score (``4 x queued + running``) is
weighed by its step time over the median of the replicas' (``load_report.speed_factors``:
none yet counts as average, within a quarter of the median as equal, clamped to [1/4, 4]), so a
replica on a slower GPU gets a proportionally smaller share; idle replicas still tie.

The balance threshold (affinity_policy.py ranks with it): a replica whose figure is more than
``threshold(imbalance_threshold, least)`` above the least one's is passed over, prefix or not.
In ``load`` points, the default 8 is two queued requests, or eight running ones; and an eighth
above the least once that is more, so a busy fleet does not spill on noise. SGLang's
cache-aware router has the same idea with an absolute and a relative bound (the system counts
as imbalanced only when both are exceeded); here the larger of the two is the slack.
"""

from __future__ import annotations

from typing import Optional

from tessellm.core.load_report import CoreLoad, load_score, load_score_parts, speed_factors

BALANCES = ("load", "in_flight")  # router.balance
_SLACK_FRACTION = 8  # load: also an eighth above the least score, when that is more


def load_report(stats: dict, in_flight: int, block_size: int, in_flight_samples: Optional[int] = None) -> dict:
    """What an engine replica reports to the routers: its engine's load figures (``stats``: the
    answer of the core's ``stats`` call, which carries ``core_load`` as ``"load"``), the
    requests it held when it asked (``in_flight``) and the sequences they run
    (``in_flight_samples``, as many when None), and its KV block size."""
    load = stats.get("load") or {"waiting": stats.get("num_waiting", 0),
                                 "running": stats.get("num_running", 0)}
    samples = in_flight if in_flight_samples is None else in_flight_samples
    return {"load": dict(load), "in_flight": int(in_flight), "in_flight_samples": int(samples),
            "block_size": int(block_size)}


def _sequences(report: dict, ongoing: int) -> int:
    """``ongoing`` requests in the engine's unit, sequences (module docstring, Samples): plus
    the report's extra sequences, in the share of its requests still there at most."""
    in_flight = int(report.get("in_flight", 0))
    extra = int(report.get("in_flight_samples", in_flight)) - in_flight
    if extra <= 0 or in_flight <= 0:
        return ongoing
    return ongoing + extra * min(max(0, ongoing), in_flight) // in_flight


def replica_speeds(reports: list) -> list[float]:
    """Each replica's speed factor (module docstring, Speed) from its latest report's step time
    (``load_report.speed_factors``: a replica with none counts as average)."""
    return speed_factors([((r or {}).get("load") or {}).get("step_ms") for r in reports])


def replica_score(report: Optional[dict], ongoing: int, num_prompt_tokens: int, num_samples: int = 1,
                  speed: float = 1.0, shared_tokens: int = 0):
    """A replica's ``load`` score for a prompt of ``num_prompt_tokens`` running ``num_samples``
    sequences (module docstring): ``report`` is its latest ``load_report`` (None or {}: none
    yet), ``ongoing`` its requests now as this router sees them, ``speed`` its speed factor
    (``replica_speeds``: the work ahead is weighed by it, the request's own term is not),
    ``shared_tokens`` the prompt's leading tokens its requests in flight there hold (module
    docstring, Prefix sharing: their blocks are not taken from the free ones)."""
    if not report or "load" not in report:
        return load_score(CoreLoad(running=max(0, ongoing)), 0, num_prompt_tokens, 1, num_samples)
    figures = CoreLoad.from_dict(report["load"])
    ongoing = _sequences(report, ongoing)
    # Against what the engine counted: a request the replica held but had not yet handed to its
    # engine (its front end still parsing or tokenizing it) counts as arrived since.
    change = ongoing - (figures.waiting + figures.running)
    if change < 0:  # requests finished since: their slots go to the waiting ones first
        freed = min(-change, figures.running)
        moved = min(freed, figures.waiting)
        figures.running += moved - freed
        figures.waiting -= moved
        if figures.free_seqs is not None:
            figures.free_seqs += freed - moved
    block_size = int(report.get("block_size", 16))
    if figures.waiting and figures.free_seqs is not None and figures.free_blocks is not None:
        # Waiting with request slots and KV blocks free: held back by one step's token budget
        # only, they start within a step or two; a snapshot of that a second old is no queue.
        if figures.waiting_blocks is not None:  # the engine's count, prefix sharing included
            fit = (figures.waiting if figures.waiting_blocks <= figures.free_blocks
                   else figures.waiting * figures.free_blocks // figures.waiting_blocks)
            admitted = max(0, min(figures.waiting, figures.free_seqs, fit))
            taken = -(-figures.waiting_blocks * admitted // figures.waiting)
        else:  # an engine that does not count it: each at the new prompt's size
            need = max(1, -(-num_prompt_tokens // max(1, block_size)))
            admitted = max(0, min(figures.waiting, figures.free_seqs, figures.free_blocks // need))
            taken = admitted * need
        figures.waiting -= admitted
        figures.running += admitted
        figures.free_seqs -= admitted
        figures.free_blocks -= taken
    arrived = max(0, change)
    if figures.waiting:  # they queue behind those
        started = 0
    elif figures.free_seqs is None:
        started = arrived
    else:
        started = min(arrived, max(0, figures.free_seqs))
        figures.free_seqs -= started
    figures.running += started
    ahead, own = load_score_parts(figures, arrived - started, num_prompt_tokens, block_size, num_samples,
                                  shared_tokens)
    return ahead + own if speed == 1.0 else ahead * speed + own


def threshold(imbalance_threshold: int, least: int, balance: str) -> int:
    """How far above the least figure a replica may be and still win on its prefix."""
    if balance == "load":
        return max(imbalance_threshold, least // _SLACK_FRACTION)
    return imbalance_threshold
