"""Speculative decoding under async scheduling: a request scheduled while its step in flight
samples, whose accepted count the scheduler does not know yet. Plain Python, no torch.

Without speculation a step ahead feeds one placeholder token (its id only the device knows).
With it, the step in flight may accept 1 .. k+1 tokens, so both where the next step starts and
which drafts it verifies are unknown when it is scheduled. The scheduler reserves the most the
step could need and the runner, which reads the step in flight's tokens before it builds the
next one, fills in the truth (as vLLM's async scheduler does with draft placeholders)::

    request a: 9 tokens computed; step N in flight verifies [t9 d0 d1] (accepts 1..3 tokens)
    schedule N+1 (N still runs):  tokens_ahead = 3, so as if all of N were accepted:
        position 12, 1 + k slots reserved (k = the load policy's drafts, cut to the budget,
        the context and max_tokens as if N accepted everything), k + 1 sampled rows at most
        -> SchedulerOutput.spec_ahead[a] = k, blocks allocated for all of it
    runner, launching N+1:  reads N's tokens (say 2 accepted: t10 t11), proposes, and runs
        [t11 e0 .. e(j-1)] from position 11, j <= k of its proposer's drafts
        -> ModelRunnerOutput.spec_ahead_drafts[a] = j
    update(N):    computed = 9 + 2 = 11; blocks past 11 + tokens_ahead (1 + k, N+1's upper
                  bound) + lookahead given back (SchedulerOutput.kept_blocks tells the runner)
    update(N+1):  computed += accepted (1 .. j+1), the same give-back

Above the load policy's cut-off (no drafts) a request whose step in flight is certain (it
verifies no drafts) takes the plain placeholder path instead: its next input is fed on the
device and the runner does not wait for the step in flight, so a large batch keeps the whole
async overlap.

Invariants: a request's blocks always cover ``num_computed_tokens + tokens_ahead +
num_lookahead_tokens`` (what its steps in flight may write, a draft model's guesses included);
the runner's block list equals the scheduler's once it applies ``kept_blocks`` (sent with the
next non-empty step, before any ``new_block_ids``). Requests that never draft (penalties; a
constrained request without deferred masks is not scheduled ahead at all) keep the plain
placeholder path.
"""

from __future__ import annotations

from typing import Optional

from tessellm.core.in_flight import InFlightSteps
from tessellm.core.request import Request


class SpecAhead:
    def __init__(self, in_flight: InFlightSteps, max_model_len: int, num_speculative_tokens: int,
                 disable_by_batch_size: int):
        self.in_flight = in_flight
        self.max_model_len = max_model_len
        self.k = num_speculative_tokens
        self.disable_by_batch_size = disable_by_batch_size  # the load policy (SpeculativeConfig)
        self.reserved: dict[str, int] = {}  # drafts reserved in the step being built

    @classmethod
    def of(cls, config, in_flight: InFlightSteps) -> Optional["SpecAhead"]:
        """For a ``SchedulerConfig``: None unless async scheduling and speculation are on."""
        if not (config.async_scheduling and config.num_speculative_tokens):
            return None
        return cls(in_flight, config.max_model_len, config.num_speculative_tokens,
                   config.disable_by_batch_size)

    def applies(self, req: Request) -> bool:
        """A request in flight whose step samples and that may draft."""
        if not self.in_flight.samples_ahead(req.request_id):
            return False
        return req.grammar is None and not req.sampling_params.needs_penalties

    def reserve(self, req: Request, budget: int, batch_size: int) -> Optional[int]:
        """Tokens to schedule for ``req`` (1 + k reserved drafts), or 0: not this step (the step
        in flight may end it), or None: the plain placeholder path (no drafts after a step in
        flight that verifies none). Records k in ``reserved``."""
        rid = req.request_id
        # Tokens known after the steps in flight if every draft in them is accepted.
        tokens = req.num_computed_tokens + self.in_flight.tokens_ahead(rid) + 1
        gain = tokens - req.num_tokens
        params = req.sampling_params
        if tokens >= self.max_model_len:
            return 0  # the step in flight may reach the context: wait for it
        room = self.max_model_len - tokens
        if params.max_tokens is not None:
            left = params.max_tokens - (req.num_output_tokens + gain)
            if left <= 0:
                return 0  # ... or max_tokens
            room = min(room, left - 1)
        k = self.k
        if self.disable_by_batch_size and batch_size >= self.disable_by_batch_size:
            k = 0
            if not self._uncertain(rid):
                return None
        k = max(0, min(k, room, budget - 1))
        self.reserved[rid] = k
        return 1 + k

    def _uncertain(self, rid: str) -> bool:
        """A step in flight may accept a number of tokens for ``rid`` not known yet."""
        return any(rid in st.sched.spec_token_ids or st.sched.spec_ahead.get(rid)
                   for st in self.in_flight.steps)

    def take(self, rid: str) -> Optional[int]:
        """The drafts reserved for ``rid`` in this step (None: it is not a step ahead)."""
        return self.reserved.pop(rid, None)


def give_back(kv, req: Request, keep_tokens: int, kept_blocks: dict[str, int]) -> None:
    """Free the request's blocks past ``keep_tokens`` (rejected or unused draft slots; what its
    steps in flight may still write stays) and note the count for the runner."""
    if kv.truncate(req, keep_tokens):
        kept_blocks[req.request_id] = len(kv.block_ids(req.request_id))


def computed_and_drafts(sched, result, rid: str, num: int) -> tuple[int, int]:
    """(tokens the step computed for ``rid``, drafts it verified): the runner's count for a
    step ahead, else the scheduled ones."""
    if rid in sched.spec_ahead:
        drafts = result.spec_ahead_drafts.get(rid, 0)
        return 1 + drafts, drafts
    return num, len(sched.spec_token_ids.get(rid, ()))
