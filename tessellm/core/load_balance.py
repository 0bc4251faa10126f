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

Speed (both policies; opt-in, ``TESSELLM_BALANCE_BY_STEP_TIME=1``: a step's time follows its
batch and prefill as much as its hardware): each core also reports ``step_ms``, an exponential moving average of
the wall time of its steps that computed tokens, from launch (or the result before) to result
(``StepTimer``; none before its 8th). The cost
the policy compares is the work ahead (``4 x queued + running``; tokens: all of them) times the
core's speed factor, plus the request's own term: the factor is its step time over the median
of the cores' (those that have one; a core with no history counts as average, factor 1),
clamped to ``[1/4, 4]``, and 1 while within a quarter of the median (identical cores on noisy
steps are not told apart). Idle cores tie whatever their speeds: a step time left over from a
long prefill never decides alone. A score counts requests and steps of work ahead; times the time a step takes
there it is time, so a core whose steps take twice as long (a slower GPU, a core busy with long
prefill chunks) gets about half the share. Step time, not tokens per second: a core's tokens
per second grow with its batch (decode reads the weights once for the whole batch), so a busy
core would look fast and draw more (a feedback loop); its step time grows with its batch, which
only adds to the score's own pull away from it. The moving average (``1/16`` per step) and the
dead band keep the factor from flapping.

Invariants:

* ``load[c]`` is the sum of ``weight`` over the requests ``owner`` gives to core ``c``;
  ``num_requests[c]`` counts them; ``sent[c]`` counts every core request ever sent there, and
  ``sent[c] - reports[c].received`` of them have not reached the core as of its last report.
* Cost first: a request may go to a core whose cost (the policy's: score, or tokens) is at
  most ``slack`` above the least one's (load: ``max(2, least // 8)``, two requests that start
  at once, or an eighth more; tokens: ``max(2 * its prompt tokens, 16 blocks, least // 8)``,
  two requests like it, a few short chats, or an eighth more), plus what that core's cache
  saves the request over the least-cost core's (load: 4 points, one queued request, per whole
  step of token budget, ``token_budget``, of prompt it need not prefill; tokens: those
  tokens). A core holding more of the prompt than the least-cost core is scored with the
  requests sent since its report as running where that report shows room for them
  (``_holder_parts``): they start at once there. So prefix affinity costs at most that much
  queueing, and a hot prefix spills onto the other cores once its holder has no room.
* Among those, the core whose cache is worth most to the request's chain wins: what its
  prefix cache holds by its own reports, or will hold, the requests in flight there
  (``cache_view.CacheView``). A core's worth is its leading run of device blocks, then the
  run its host tier holds after them (``--kv-offloading-size``: loaded back, not recomputed),
  each host block counted as ``3/4`` of a device block (``_HOST_WORTH``: on an H100 a
  7984-token prompt came back from the host tier in 55 ms of TTFT against 215 ms recomputed,
  about three quarters of the compute saved). So a device holder beats a host-tier holder of
  the same prefix, which beats a cold core; the savings above count host blocks so too. Ties, and requests whose prefix no eligible core holds, go to the
  least cost, then the fewest tokens, then round-robin (an idle server spreads its requests
  instead of always using core 0).
* The chain is the prompt's full KV blocks' prefix-cache hashes, exactly as the cores' block
  managers compute them (``iter_request_block_hashes``: the cache salt, the LoRA adapter,
  images and prompt embeddings in each block's key), cut to 64 bits: the first ``max_blocks``,
  then more only while some core holds every block so far (``_deepen``: a long cached prefix
  counts whole, an uncached long prompt is not hashed past ``max_blocks``), after a first link
  for the LoRA adapter: every request for an adapter shares that link, so adapter
  requests gather on the core that holds the adapter in its slots while costs allow (the cores
  do not report their adapters: the link counts while the adapter's requests are in flight
  there, and is remembered after, until it ages out of the view).

    prompt:  |<- block 0 ->|<- block 1 ->| ... |tail|
    chain:   ("lora", id)   h0 = H(b0, key)   h1 = H(h0, b1, key) ...   (no tail: not cacheable)
"""

from __future__ import annotations

from dataclasses import replace
from itertools import islice
from typing import Iterable, Iterator, Optional

from tessellm.core.block_manager import iter_block_hashes
from tessellm.core.cache_view import HOST, CacheView, short_hash
from tessellm.core.load_report import _WAITING_WEIGHT, CoreLoad, load_score_parts, speed_factors

POLICIES = ("load", "tokens")  # --data-parallel-balance
_MIN_SLACK_SCORE = 2  # load: score points a core may be above the least and win on affinity
_MIN_SLACK = 2  # tokens: requests like this one a core may be above the least loaded ...
_MIN_SLACK_BLOCKS = 16  # ... or this many blocks of tokens (noise: a few short chats)
_SLACK_FRACTION = 8  # ... or this fraction (1/8) of the least cost, when larger
_MAX_BLOCKS = 256  # leading KV blocks of a prompt hashed for affinity (4096 tokens at 16)
_MAX_VIEW_ENTRIES = 100_000  # block hashes of a core's prefix cache the view keeps (LRU), per tier
_DEVICE_WORTH, _HOST_WORTH = 4, 3  # a cached block's worth, on the device and in the host tier


class LoadBalancer:
    def __init__(self, num_cores: int, block_size: int, affinity: bool = True,
                 max_blocks: int = _MAX_BLOCKS, policy: str = "load",
                 max_view_entries: int = _MAX_VIEW_ENTRIES):
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
        self.view = CacheView(num_cores, max_view_entries)  # what each core's prefix cache holds
        self._picked: Optional[tuple[int, list]] = None  # the last pick's (core, chain), for assign
        self._next = 0  # where the round-robin among equal cores starts

    def pick(self, prompt_token_ids, lora_id: Optional[int] = None, cache_salt: Optional[object] = None,
             block_hashes: Optional[Iterable[int]] = None) -> int:
        """The core for a request (module docstring). ``block_hashes``: its prompt's block
        hashes, a list or an iterator (``iter_request_block_hashes``: past the first
        ``max_blocks`` it is read only while some core holds every block so far); without them
        they are computed from the token ids, ``lora_id`` and ``cache_salt`` as a text
        prompt's (a string salt, or None)."""
        self._picked = None
        if self.num_cores == 1:
            return 0
        cores = range(self.num_cores)
        n = len(prompt_token_ids)
        chain, rest = self._chain(prompt_token_ids, lora_id, cache_salt, block_hashes) if self.affinity else ([], None)
        speed = speed_factors([r.step_ms for r in self.reports])
        if self.policy == "load":
            cost = [self._cost(self._score_parts(i, n), speed[i]) for i in cores]
            least = min(cost)
            slack = max(_MIN_SLACK_SCORE, least // _SLACK_FRACTION)
        else:
            cost = [self.load[i] * speed[i] for i in cores]
            least = min(cost)
            slack = max(_MIN_SLACK * n, _MIN_SLACK_BLOCKS * self.block_size, least // _SLACK_FRACTION)
        eligible = [i for i in cores if cost[i] <= least + slack]
        if chain:
            tiers = [list(t) for t in self.view.tiered_depths(chain)]  # (device, host) runs
            head = 1 if lora_id is not None else 0  # the adapter link: no tokens saved
            if len(chain) == head + self.max_blocks and max(d + h for d, h in tiers) == len(chain):
                self._deepen(chain, tiers, rest)
            worth = [_DEVICE_WORTH * d + _HOST_WORTH * h for d, h in tiers]
            base = max(max(worth[i] for i in cores if cost[i] == least), _DEVICE_WORTH * head)
            eligible = []
            for i in cores:
                extra = (worth[i] - base) * self.block_size // _DEVICE_WORTH  # tokens saved beyond the least's
                held = cost[i] if extra <= 0 or self.policy != "load" else self._cost(self._holder_parts(i, n), speed[i])
                if held <= least + slack + self._saving(i, extra):
                    eligible.append(i)
            best = max(worth[i] for i in eligible)
            if best > 0:
                eligible = [i for i in eligible if worth[i] == best]
        choice = min(eligible, key=lambda i: (cost[i], self.load[i], (i - self._next) % self.num_cores))
        self._next = (choice + 1) % self.num_cores
        if chain:
            self.view.touch(choice, chain)
            self._picked = (choice, chain)
        return choice

    def _deepen(self, chain: list, tiers: list[list[int]], rest) -> None:
        """Some core holds every link of ``chain`` (device run, then host run: ``tiers``): read
        on into ``rest`` (the prompt's later block hashes) while some core holds them all, so a
        long cached prefix (a shared document, a long conversation) is measured whole, and
        hashed only where it is cached."""
        for h in rest:
            h = short_hash(h)
            grown = False
            for i, t in enumerate(tiers):
                if t[0] + t[1] != len(chain):
                    continue
                if t[1] == 0 and self.view.holds(i, h):
                    t[0] += 1
                elif self.view.holds(i, h, HOST):
                    t[1] += 1
                else:
                    continue
                grown = True
            if not grown:
                return
            chain.append(h)

    def _holder_parts(self, core: int, num_prompt_tokens: int) -> tuple[int, int]:
        """``load_score_parts`` for a core whose cache holds more of the prompt than the
        least-cost core's: the requests sent since its report count as running, not queued,
        where that report shows room for them and this one (nothing waiting, free slots, KV
        blocks for prompts like this one), as they will start at once there. So a burst sharing
        a cached prefix gathers on its holder while it has room, and spills once it has none."""
        r = self.reports[core]
        unreceived = max(0, self.sent[core] - r.received)
        taken = -(-num_prompt_tokens // self.block_size) * unreceived  # blocks, as prompts like this
        if not unreceived or r.waiting or not ((r.free_seqs is None or r.free_seqs > unreceived)
                                                and (r.free_blocks is None or taken < r.free_blocks)):
            return self._score_parts(core, num_prompt_tokens)
        started = replace(r, running=r.running + unreceived,
                          free_seqs=None if r.free_seqs is None else r.free_seqs - unreceived,
                          free_blocks=None if r.free_blocks is None else r.free_blocks - taken)
        return load_score_parts(started, 0, num_prompt_tokens, self.block_size)

    @staticmethod
    def _cost(parts: tuple[int, int], speed: float) -> float:
        """A load score weighed by the core's speed factor: the work ahead times the factor,
        plus the request's own term (module docstring, Speed). Idle cores tie whatever their
        speeds (round-robin spreads an idle fleet's requests, and a stale step time from a
        long prefill never decides alone)."""
        ahead, own = parts
        return ahead * speed + own if speed != 1.0 else ahead + own

    def _saving(self, core: int, cached_tokens: int) -> int:
        """What ``cached_tokens`` more prompt tokens in ``core``'s cache are worth in the
        policy's cost (module docstring)."""
        if cached_tokens <= 0:
            return 0
        if self.policy == "tokens":
            return cached_tokens
        budget = self.reports[core].token_budget
        return _WAITING_WEIGHT * (cached_tokens // budget) if budget else 0

    def score(self, core: int, num_prompt_tokens: int) -> int:
        """The load policy's score of ``core`` once a prompt of ``num_prompt_tokens`` lands there
        (module docstring): its last report, with what was sent since as queued."""
        return sum(self._score_parts(core, num_prompt_tokens))

    def _score_parts(self, core: int, num_prompt_tokens: int) -> tuple[int, int]:
        r = self.reports[core]
        return load_score_parts(r, self.sent[core] - r.received, num_prompt_tokens, self.block_size)

    def report(self, core: int, figures: Optional[dict], cache_events: Optional[dict] = None) -> None:
        """``core``'s figures from its latest outputs message (``core_load``); None (a core that
        reports none) keeps the last. ``cache_events``: its prefix cache's changes since its
        previous message (``cache_view.CacheEvents.drain``)."""
        if figures:
            self.reports[core] = CoreLoad.from_dict(figures)
        if cache_events:
            self.view.apply(core, cache_events)

    def chain(self, token_ids, lora_id: Optional[int] = None, cache_salt: Optional[object] = None,
              block_hashes: Optional[Iterable[int]] = None) -> list:
        """The request's affinity chain, its first ``max_blocks`` blocks (module docstring); []
        for a prompt with no full block and no adapter. ``block_hashes``: as ``pick``."""
        return self._chain(token_ids, lora_id, cache_salt, block_hashes)[0]

    def _chain(self, token_ids, lora_id, cache_salt, block_hashes) -> tuple[list, Iterator[int]]:
        """The chain, and the iterator of the block hashes past it."""
        if block_hashes is None:
            key = cache_salt if lora_id is None else (cache_salt, "lora", lora_id)  # Request.block_key
            block_hashes = iter_block_hashes(token_ids, self.block_size, lambda start, end: key)
        rest = iter(block_hashes)
        chain: list = [("lora", lora_id)] if lora_id is not None else []
        chain.extend(short_hash(h) for h in islice(rest, self.max_blocks))
        return chain, rest

    def assign(self, core_request_id: str, core: int, num_prompt_tokens: int) -> None:
        """``core_request_id`` (a prompt of ``num_prompt_tokens``) went to ``core`` (the last
        ``pick``'s choice: its chain counts as held there while it is in flight)."""
        self.owner[core_request_id] = core
        self.weight[core_request_id] = num_prompt_tokens
        self.load[core] += num_prompt_tokens
        self.num_requests[core] += 1
        self.sent[core] += 1
        picked, self._picked = self._picked, None
        if picked is not None and picked[0] == core:
            self.view.hold(core_request_id, core, picked[1])
            if picked[1] and isinstance(picked[1][0], tuple):  # the adapter stays loaded there
                self.view.remember(core, picked[1][0])

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
            self.view.drop(core_request_id)
        return core


def iter_request_block_hashes(req, block_size: int) -> Iterator[int]:
    """The prefix-cache hashes of an ``EngineCoreRequest``'s full prompt blocks, one by one,
    exactly as its core's block manager computes them (a ``Request`` built from the same fields
    gives the extra keys: cache salt, LoRA adapter id, images, prompt embeddings)."""
    if len(req.prompt_token_ids) < block_size:
        return iter(())
    from tessellm.core.request import Request
    from tessellm.lora.request import LoRARequest

    shadow = Request(req.request_id, req.prompt_token_ids, req.sampling_params, cache_salt=req.cache_salt,
                     lora_request=LoRARequest.from_dict(req.lora_request), mm_features=req.mm_features,
                     prompt_embeds=req.prompt_embeds)
    return iter_block_hashes(shadow.prompt_token_ids, block_size, shadow.block_key)


def request_block_hashes(req, block_size: int, max_blocks: Optional[int] = None) -> list[int]:
    """The first ``max_blocks`` (all when None) of ``iter_request_block_hashes``."""
    return list(islice(iter_request_block_hashes(req, block_size), max_blocks))
