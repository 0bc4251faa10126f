"""Which data-parallel engine core gets a request: plain Python, in the front end.

Two policies (``--data-parallel-balance``):

* ``load`` (default): each core's own figures, reported with every step's outputs (a few
  integers, no extra round trip: ``core_load``): its queued and running requests, free request
  slots and KV blocks, and the whole steps of prompt still to prefill for its running
  requests. A request goes to the core with the lowest score *after it lands there*::

      queued  = waiting + sent since that report, not yet received + prefill steps ahead
      score   = 4 * queued + running + (1 if it would start at once there else 4)

  "At once": nothing queued, a free request slot, and free KV blocks for its prompt. Waiting
  weighs four times running, as in vLLM's data-parallel client (a queued request delays its
  first token; a running one slows each step a little). The requests sent since a core's last
  report count as queued until the core says it has received them (it reports how many adds it
  has had), so a burst of arrivals spreads over the cores instead of landing on the one that
  looked idle; vLLM's client adds what it sent the same way, between coordinator reports.
  Score ties go to the core with fewer tokens (below), then round-robin.
* ``tokens``: the front end's own count, in tokens. It sees every request go in, every token
  come out and every request finish, so it knows over the core requests (one per sample) it
  sent to a core that have not finished or been aborted, queued or running, their prompt tokens
  plus the tokens they generated so far (the KV they hold, and what each decode step reads; a
  queued prompt is that much prefill still to do). A core with one 30k-token request is busier
  than one with three short chats. Blind to what only the core knows: a queue behind a full
  batch (``max_num_seqs``) or a full KV cache, prefix-cache sharing, preemptions.

Invariants:

* ``load[c]`` is the sum of ``weight`` over the requests ``owner`` gives to core ``c``;
  ``num_requests[c]`` counts them; ``sent[c]`` counts every core request ever sent there, and
  ``sent[c] - reports[c].received`` of them have not reached the core as of its last report.
* Cost first: a request goes to a core whose cost (the policy's: score, or tokens) is at most
  ``slack`` above the least one's (load: ``max(2, least // 8)``, two requests that start at
  once, or an eighth more; tokens: ``max(2 * its prompt tokens, 16 blocks, least // 8)``, two
  requests like it, a few short chats, or an eighth more), so prefix affinity costs at most that
  much queueing, and a hot prefix spills onto the other cores instead of piling up on one.
* Among those, the core that was sent the longest leading run of the request's prefix chain
  wins (its prefix cache probably holds those KV blocks); ties, and requests whose prefix no
  eligible core holds, go to the least cost, then the fewest tokens, then round-robin (an idle
  server spreads its requests instead of always using core 0).
* The chain is the prompt's full KV blocks, each hash covering its block and every one before it
  (as the engine's prefix cache hashes them), after a first link for the LoRA adapter and the
  cache salt: every request for an adapter shares that link, so adapter requests gather on the
  core that holds the adapter in its slots while costs allow. Only the first ``max_blocks``
  blocks are hashed: enough to tell a shared system prompt, cheap for a long prompt.

    prompt:  |<- block 0 ->|<- block 1 ->| ... |tail|
    chain:   m = H(lora, salt)   h0 = H(m, b0)   h1 = H(h0, b1) ...   (no tail: not cacheable)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from tessellm.core.prefix_index import PrefixIndex

POLICIES = ("load", "tokens")  # --data-parallel-balance
_WAITING_WEIGHT = 4  # a queued request weighs this many running ones (vLLM's client: 4)
_MIN_SLACK_SCORE = 2  # load: score points a core may be above the least and win on affinity
_MIN_SLACK = 2  # tokens: requests like this one a core may be above the least loaded ...
_MIN_SLACK_BLOCKS = 16  # ... or this many blocks of tokens (noise: a few short chats)
_SLACK_FRACTION = 8  # ... or this fraction (1/8) of the least cost, when larger
_MAX_BLOCKS = 32  # leading KV blocks of a prompt hashed for affinity
_MAX_ENTRIES = 50_000  # chain hashes remembered per core (LRU)


@dataclass
class CoreLoad:
    """A core's figures for the balancer, as of its latest step (``core_load``). Before its
    first report a core counts as idle with room for anything."""

    waiting: int = 0  # requests queued (or preempted), not running
    running: int = 0  # requests holding KV blocks, decoding or prefilling
    free_seqs: Optional[int] = None  # request slots left (max_num_seqs - running); None: unknown
    free_blocks: Optional[int] = None  # KV blocks free (cached-but-free included); None: unknown
    prefill_steps: int = 0  # whole steps of token budget the running requests' prompts still take
    received: int = 0  # requests the core has received from the front end since it started

    @classmethod
    def from_dict(cls, d: dict) -> "CoreLoad":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def core_load(scheduler, received: int) -> dict:
    """What a core reports with each step's outputs (``CoreLoad`` as a dict): its scheduler's
    queues and free room, and ``received``, the adds it has had. One pass over the running
    requests (their prompt tokens not yet computed); sent only when there are several cores."""
    pending = 0
    for req in scheduler.running:
        pending += max(0, req.num_prompt_tokens - req.num_computed_tokens)
    config = scheduler.config
    return {"waiting": len(scheduler.waiting), "running": len(scheduler.running),
            "free_seqs": config.max_num_seqs - len(scheduler.running),
            "free_blocks": scheduler.kv.num_free_blocks,
            "prefill_steps": pending // max(1, config.max_num_batched_tokens), "received": received}


def load_score(report: CoreLoad, unreceived: int, num_prompt_tokens: int, block_size: int) -> int:
    """The load policy's score (module docstring) of an engine with ``report`` as its latest
    figures and ``unreceived`` requests sent to it since, once a prompt of ``num_prompt_tokens``
    lands there. Shared with the Ray Serve router (entrypoints/ray_serve/prefix_router.py)."""
    queued = report.waiting + max(0, unreceived) + report.prefill_steps
    at_once = (queued == 0 and (report.free_seqs is None or report.free_seqs > 0)
               and (report.free_blocks is None
                    or -(-num_prompt_tokens // max(1, block_size)) <= report.free_blocks))
    return _WAITING_WEIGHT * queued + report.running + (1 if at_once else _WAITING_WEIGHT)


class LoadBalancer:
    def __init__(self, num_cores: int, block_size: int, affinity: bool = True,
                 max_blocks: int = _MAX_BLOCKS, policy: str = "load"):
        if policy not in POLICIES:
            raise ValueError(f"data_parallel_balance {policy!r} is not supported; use load (the "
                             "cores' reported queues) or tokens (the tokens the front end has seen).")
        self.num_cores = num_cores
        self.block_size = block_size
        self.affinity = affinity and num_cores > 1
        self.max_blocks = max_blocks
        self.policy = policy
        self.load = [0] * num_cores  # tokens of the core requests of each core (module docstring)
        self.num_requests = [0] * num_cores  # core requests of each core, not finished or aborted
        self.sent = [0] * num_cores  # core requests ever sent to each core
        self.reports = [CoreLoad() for _ in range(num_cores)]  # each core's latest figures
        self.owner: dict[str, int] = {}  # core request id -> its core
        self.weight: dict[str, int] = {}  # core request id -> its prompt + generated tokens
        self._index = PrefixIndex(_MAX_ENTRIES)
        self._next = 0  # where the round-robin among equal cores starts

    def pick(self, prompt_token_ids, lora_id: Optional[int] = None, cache_salt: Optional[object] = None) -> int:
        """The core for a request (module docstring). ``cache_salt``: any hashable that keys the
        prompt's KV besides its token ids (the front end passes ``core_group.affinity_key``: the
        salt, and the hashes of given embeddings or images)."""
        if self.num_cores == 1:
            return 0
        cores = range(self.num_cores)
        n = len(prompt_token_ids)
        chain = self.chain(prompt_token_ids, lora_id, cache_salt) if self.affinity else []
        if self.policy == "load":
            cost = [self.score(i, n) for i in cores]
            least = min(cost)
            slack = max(_MIN_SLACK_SCORE, least // _SLACK_FRACTION)
        else:
            cost = self.load
            least = min(cost)
            slack = max(_MIN_SLACK * n, _MIN_SLACK_BLOCKS * self.block_size, least // _SLACK_FRACTION)
        eligible = [i for i in cores if cost[i] <= least + slack]
        if chain:
            depth = self._index.match(chain, eligible)
            best = max(depth.values())
            if best > 0:
                eligible = [i for i in eligible if depth[i] == best]
        choice = min(eligible, key=lambda i: (cost[i], self.load[i], (i - self._next) % self.num_cores))
        self._next = (choice + 1) % self.num_cores
        if chain:
            self._index.record(choice, chain)
        return choice

    def score(self, core: int, num_prompt_tokens: int) -> int:
        """The load policy's score of ``core`` once a prompt of ``num_prompt_tokens`` lands there
        (module docstring): its last report, with what was sent since as queued."""
        r = self.reports[core]
        return load_score(r, self.sent[core] - r.received, num_prompt_tokens, self.block_size)

    def report(self, core: int, figures: Optional[dict]) -> None:
        """``core``'s figures from its latest outputs message (``core_load``); None (a core that
        reports none) keeps the last."""
        if figures:
            self.reports[core] = CoreLoad.from_dict(figures)

    def chain(self, token_ids, lora_id: Optional[int], cache_salt: Optional[object]) -> list[int]:
        """The request's affinity chain (module docstring); [] for a prompt with no full block
        and no adapter or salt."""
        n = min(len(token_ids) // self.block_size, self.max_blocks)
        chain = []
        h = hash(("tessellm-dp", lora_id, cache_salt))
        if lora_id is not None or cache_salt is not None:
            chain.append(h)
        bs = self.block_size
        for b in range(n):
            h = hash((h, tuple(token_ids[b * bs:(b + 1) * bs])))
            chain.append(h)
        return chain

    def assign(self, core_request_id: str, core: int, num_prompt_tokens: int) -> None:
        """``core_request_id`` (a prompt of ``num_prompt_tokens``) went to ``core``."""
        self.owner[core_request_id] = core
        self.weight[core_request_id] = num_prompt_tokens
        self.load[core] += num_prompt_tokens
        self.num_requests[core] += 1
        self.sent[core] += 1

    def generated(self, core_request_id: str, num_tokens: int) -> None:
        """It generated ``num_tokens`` more (ignored once it is released)."""
        core = self.owner.get(core_request_id)
        if core is not None and num_tokens:
            self.weight[core_request_id] += num_tokens
            self.load[core] += num_tokens

    def release(self, core_request_id: str) -> Optional[int]:
        """It finished or was aborted: its core (None if unknown, e.g. finished already)."""
        core = self.owner.pop(core_request_id, None)
        if core is not None:
            self.load[core] -= self.weight.pop(core_request_id)
            self.num_requests[core] -= 1
        return core
