"""Which data-parallel engine core gets a request: plain Python, in the front end.

The front end sees every request go in, every token come out and every request finish, so it
knows each core's load exactly, in tokens: over the core requests (one per sample) it sent
there that have not finished or been aborted, queued or running, their prompt tokens plus the
tokens they generated so far (the KV they hold, and what each decode step reads; a queued
prompt is that much prefill still to do). A core with one 30k-token request is busier than one
with three short chats. (vLLM's data-parallel client learns the cores' waiting and running
counts from a coordinator process, a few milliseconds late, and adds what it sent since; in one
process the exact count costs nothing.)

Invariants:

* ``load[c]`` is the sum of ``weight`` over the requests ``owner`` gives to core ``c``;
  ``num_requests[c]`` counts them.
* Load first: a request goes to a core whose load is at most ``slack`` above the least
  loaded one's (``slack = max(2 * its prompt tokens, 16 blocks, least // 8)``: two requests
  like it, a few short chats, or an eighth more), so prefix affinity costs at most that much
  queueing, and a hot prefix spills onto the other cores instead of piling up on one.
* Among those, the core that was sent the longest leading run of the request's prefix chain
  wins (its prefix cache probably holds those KV blocks); ties, and requests whose prefix no
  eligible core holds, go to the least loaded, then round-robin (an idle server spreads its
  requests instead of always using core 0).
* The chain is the prompt's full KV blocks, each hash covering its block and every one before it
  (as the engine's prefix cache hashes them), after a first link for the LoRA adapter and the
  cache salt: every request for an adapter shares that link, so adapter requests gather on the
  core that holds the adapter in its slots while loads allow. Only the first ``max_blocks``
  blocks are hashed: enough to tell a shared system prompt, cheap for a long prompt.

    prompt:  |<- block 0 ->|<- block 1 ->| ... |tail|
    chain:   m = H(lora, salt)   h0 = H(m, b0)   h1 = H(h0, b1) ...   (no tail: not cacheable)
"""

from __future__ import annotations

from typing import Optional

from tessellm.core.prefix_index import PrefixIndex

_MIN_SLACK = 2  # requests like this one a core may be above the least loaded and win on affinity
_MIN_SLACK_BLOCKS = 16  # ... or this many blocks of tokens (noise: a few short chats)
_SLACK_FRACTION = 8  # ... or this fraction (1/8) of the least load, when larger
_MAX_BLOCKS = 32  # leading KV blocks of a prompt hashed for affinity
_MAX_ENTRIES = 50_000  # chain hashes remembered per core (LRU)


class LoadBalancer:
    def __init__(self, num_cores: int, block_size: int, affinity: bool = True,
                 max_blocks: int = _MAX_BLOCKS):
        self.num_cores = num_cores
        self.block_size = block_size
        self.affinity = affinity and num_cores > 1
        self.max_blocks = max_blocks
        self.load = [0] * num_cores  # tokens of the core requests of each core (module docstring)
        self.num_requests = [0] * num_cores  # core requests of each core, not finished or aborted
        self.sent = [0] * num_cores  # core requests ever sent to each core
        self.owner: dict[str, int] = {}  # core request id -> its core
        self.weight: dict[str, int] = {}  # core request id -> its prompt + generated tokens
        self._index = PrefixIndex(_MAX_ENTRIES)
        self._next = 0  # where the round-robin among equally loaded cores starts

    def pick(self, prompt_token_ids, lora_id: Optional[int] = None, cache_salt: Optional[object] = None) -> int:
        """The core for a request (module docstring). ``cache_salt``: any hashable that keys the
        prompt's KV besides its token ids (the front end passes ``core_group.affinity_key``: the
        salt, and the hashes of given embeddings or images)."""
        if self.num_cores == 1:
            return 0
        cores = range(self.num_cores)
        chain = self.chain(prompt_token_ids, lora_id, cache_salt) if self.affinity else []
        least = min(self.load[i] for i in cores)
        slack = max(_MIN_SLACK * len(prompt_token_ids), _MIN_SLACK_BLOCKS * self.block_size,
                    least // _SLACK_FRACTION)
        eligible = [i for i in cores if self.load[i] <= least + slack]
        if chain:
            depth = self._index.match(chain, eligible)
            best = max(depth.values())
            if best > 0:
                eligible = [i for i in eligible if depth[i] == best]
        low = min(self.load[i] for i in eligible)
        tied = [i for i in eligible if self.load[i] == low]
        choice = min(tied, key=lambda i: (i - self._next) % self.num_cores)
        self._next = (choice + 1) % self.num_cores
        if chain:
            self._index.record(choice, chain)
        return choice

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
