"""Continuous-batching scheduler: a token budget per step over running and waiting requests.

Plain Python, no torch. Each step it decides, per request, how many new tokens to compute;
prefill chunks and decode tokens share one flat batch.

Invariants
----------
* A request is in exactly one of ``waiting`` (WAITING or PREEMPTED) or ``running``.
* ``num_computed_tokens <= num_tokens``; a request samples a token in a step exactly when the
  step brings ``num_computed_tokens`` up to ``num_tokens`` (chunks before that only fill K/V).
* Per step: sum of scheduled tokens <= ``max_num_batched_tokens``; running <= ``max_num_seqs``.
* Running requests are served in order (oldest first). When blocks run out, the newest running
  request is preempted (its blocks freed, ``num_computed_tokens`` reset) and put back at the
  front of ``waiting``; it is recomputed later from its tokens, so its results are unchanged.
* No waiting request is admitted in a step that preempted (it would only be preempted again).
* Several batches may be in flight (``in_flight``, an ``InFlightSteps``: the steps scheduled
  whose results have not come back, and what they owe each request): under pipeline
  parallelism (one per stage) and under async scheduling (the next step is scheduled while one
  runs).
* Pipeline parallelism: a request in flight is neither scheduled again nor preempted until
  ``update`` sees its batch.
* Async scheduling (``async_scheduling``): a request in flight is scheduled again, one step
  ahead: its next prefill chunk, or, when the step in flight samples, one decode token whose id
  is a placeholder (only the device knows it; the model runner feeds it from that step's
  sampled ids). ``in_flight.tokens_ahead`` / ``samples_ahead`` count what is ahead of
  ``num_computed_tokens`` / ``all_token_ids``. A request whose in-flight steps would reach
  ``max_tokens`` or the context length is not scheduled ahead. A constrained request goes
  ahead only with ``defer_grammar`` (its mask is filled once the step before is back). One
  that stops (EOS, stop token, abort) while a step ahead runs has that step's result dropped;
  so has a request preempted while in flight (``InFlightSteps.drop``): it is recomputed later
  from its known tokens, exactly as a preemption in a synchronous step. With speculation, a
  request whose step in flight samples goes ahead with drafts reserved, not a placeholder
  (``spec_ahead.py``: the runner fills in where it starts and what it verifies).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Optional

from tessellm.core.block_manager import BlockManager
from tessellm.core.engine_output import EngineCoreOutput
from tessellm.core.in_flight import InFlightSteps
from tessellm.core.request import Request, RequestStatus
from tessellm.core.spec_ahead import SpecAhead, computed_and_drafts, give_back
from tessellm.core.step import (CachedRequestData, ModelRunnerOutput, NewRequestData,  # noqa: F401
                                SchedulerOutput)
from tessellm.spec_decode.metrics import SpecDecodeStats
from tessellm.lora.scheduling import LORA_WAIT, acquire_slot, lora_step_fields, release_slot


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256  # running requests at most
    max_num_batched_tokens: int = 8192  # tokens computed in one step at most
    max_model_len: int = 2048  # prompt + output tokens per request at most
    enable_chunked_prefill: bool = True  # split prompts longer than the step's budget
    pipeline_parallel_size: int = 1  # > 1: cached requests carry their new token ids
    async_scheduling: bool = False  # schedule requests in flight one step ahead (see above)
    # Speculative decoding: KV slots kept allocated past a request's computed tokens, for a
    # draft model's K/V of its own drafts (tessellm.spec_decode; 0 for n-gram and replay).
    num_lookahead_tokens: int = 0
    # Async scheduling: constrained requests go one step ahead too; their masks are filled after
    # the step before is back (the executor supports ``sample_deferred``). False: they wait.
    defer_grammar: bool = False
    # Speculative decoding: drafts per request (0: off) and the load policy's batch cut-off
    # (SpeculativeConfig); under async scheduling steps ahead reserve them (spec_ahead.py).
    num_speculative_tokens: int = 0
    disable_by_batch_size: int = 0


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    spec_decode: Optional[SpecDecodeStats] = None  # totals since start; None: no speculation


def check_prompt_fits(num_tokens: int, max_model_len: int, kv_capacity_tokens: int) -> None:
    """One clear ValueError for a prompt that can never run; shared by the front end and core."""
    if num_tokens == 0:
        raise ValueError("The prompt is empty; give at least one token.")
    if num_tokens >= max_model_len:
        raise ValueError(f"The prompt has {num_tokens} tokens but the model's context length is "
                         f"{max_model_len}; shorten the prompt to at most {max_model_len - 1} tokens.")
    if num_tokens + 1 > kv_capacity_tokens:
        raise ValueError(f"The prompt has {num_tokens} tokens but the KV cache holds only "
                         f"{kv_capacity_tokens} tokens; give the cache more blocks (num_kv_blocks) "
                         "or shorten the prompt.")


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.kv = block_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_ids: set[str] = set()  # ended since the last step: the runner drops them
        self.preempted_ids: set[str] = set()  # preempted while building the current step
        self.finished_outputs: list[EngineCoreOutput] = []  # ended in schedule(), see below
        self.num_preemptions_total = 0
        self.spec_stats = SpecDecodeStats()  # speculative decoding totals (vLLM's meanings)
        self.in_flight = InFlightSteps()  # steps scheduled whose results are not back yet
        self.num_scheduled_tokens_total = 0  # over all steps: the metrics' per-step token counts
        self.lora = None  # tessellm.lora.slots.LoRASlots when LoRA is enabled (adapter slots)
        self.ahead = SpecAhead.of(config, self.in_flight)  # async scheduling with speculation
        self.kept_blocks: dict[str, int] = {}  # blocks cut since the last step (rejected drafts)

    # -- admission -------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.check_fits(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def check_fits(self, request: Request) -> None:
        """Refuse a request that could never run, before it is queued."""
        check_prompt_fits(request.num_prompt_tokens, self.config.max_model_len,
                          self.kv.num_blocks * self.kv.block_size)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Finish requests as aborted and free their blocks. Unknown ids are ignored."""
        aborted = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            aborted.append(req)
        return aborted

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        spec: dict[str, list[int]] = {}
        reserved_drafts: dict[str, int] = {}  # steps ahead with speculation (spec_ahead.py)
        if self.ahead is not None:
            self.ahead.reserved.clear()  # a request preempted after reserving left its entry
        preempted = 0

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._num_new_running(req, budget)
            if num_new == 0:
                i += 1
                continue
            drafts = self._drafts(req, num_new, budget)
            num_new += len(drafts)
            ahead = self.in_flight.tokens_ahead(req.request_id)  # scheduled, after the computed ones
            lookahead = self.config.num_lookahead_tokens
            new_block_ids = self.kv.allocate(req, ahead + num_new + lookahead)
            while new_block_ids is None:
                j = self._victim_index(i)  # the newest request after req that may be preempted
                if j == i and len(self.running) == 1:
                    # Alone and still out of blocks: it outgrew the whole cache and would only
                    # preempt itself forever. It ends here, as if at its length limit.
                    self._finish_outgrown(req)
                    break
                victim = self.running.pop(j)
                self._preempt(victim)
                preempted += 1
                if victim is req:
                    break
                new_block_ids = self.kv.allocate(req, ahead + num_new + lookahead)
            if new_block_ids is None:
                break  # req itself was preempted or finished; everything after it already was
            start = req.num_computed_tokens + ahead
            tokens = []
            if self.config.pipeline_parallel_size > 1:
                tokens = req.all_token_ids[start:start + num_new]
            cached_reqs.append(CachedRequestData(req.request_id, new_block_ids, start, tokens))
            num_scheduled[req.request_id] = num_new
            reserved = self.ahead.take(req.request_id) if self.ahead is not None else None
            if reserved is not None:
                reserved_drafts[req.request_id] = reserved
            if drafts:
                spec[req.request_id] = drafts
                req.spec_token_ids = []  # they belong to this step now
            budget -= num_new
            i += 1

        if not preempted:
            budget = self._admit_waiting(budget, num_scheduled, new_reqs)

        self.num_preemptions_total += preempted
        out = SchedulerOutput(new_reqs, cached_reqs, num_scheduled, sum(num_scheduled.values()),
                              self._num_sampled(num_scheduled, spec, reserved_drafts), spec,
                              spec_ahead=reserved_drafts, kept_blocks=self.kept_blocks,
                              finished_request_ids=self.finished_ids,
                              preempted_request_ids=self.preempted_ids)
        if self.lora is not None:
            lora_step_fields(self, out)
        self.num_scheduled_tokens_total += out.total_num_scheduled_tokens
        self.finished_ids, self.preempted_ids = set(), set()
        if not out.is_empty:
            self.in_flight.add(out)
            self.kept_blocks = {}  # sent (an empty step is not: they wait for the next one)
        return out

    def _num_sampled(self, num_scheduled: dict[str, int], spec: dict[str, list[int]],
                     ahead: dict[str, int]) -> dict[str, int]:
        """How many rows the step samples for each request (absent: none).

        The one place that decides whether a step samples for a request: when it reaches the
        end of the known tokens (placeholders of steps in flight count), plus one row per draft.
        """
        num_sampled = {}
        for rid, num in num_scheduled.items():
            if rid in ahead:  # at most: the runner samples 1 + the drafts it verifies
                num_sampled[rid] = num
                continue
            req = self.requests[rid]
            k = len(spec.get(rid, ()))
            end = req.num_computed_tokens + self.in_flight.tokens_ahead(rid) + num
            if end == req.num_tokens + self.in_flight.samples_ahead(rid) + k:
                num_sampled[rid] = k + 1
        return num_sampled

    def _admit_waiting(self, budget: int, num_scheduled: dict[str, int],
                       new_reqs: list[NewRequestData]) -> int:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            if self._waits_for_sibling(req) or (req.grammar is not None and not req.grammar.ready):
                skipped.append(req)  # its grammar still compiles: others go ahead
                continue
            if req.grammar is not None and req.grammar.error is not None:
                self._finish(req, RequestStatus.FINISHED_ABORTED)
                self.finished_outputs.append(EngineCoreOutput(req.request_id, [], "abort"))
                continue
            lora = acquire_slot(self, req) if req.lora_request is not None else 0
            if lora < 0:  # its adapter is loading or every slot is busy: it waits; or it failed
                if lora == LORA_WAIT:
                    skipped.append(req)
                continue
            # Prompt logprobs need every prompt position computed: no prefix hit for those.
            use_cache = req.num_computed_tokens == 0 and req.sampling_params.prompt_logprobs is None
            prefix = self.kv.find_cached_prefix(req, count=False) if use_cache else []
            num_hit = len(prefix) * self.kv.block_size
            num_new = self._num_new_tokens(req, budget, already=num_hit)
            block_ids = (self.kv.allocate(req, num_new + self.config.num_lookahead_tokens, prefix)
                         if num_new else None)
            if block_ids is None:
                release_slot(self, req)
            if num_new == 0:
                skipped.append(req)
                break
            if block_ids is None and not self.running:
                self._finish_outgrown(req)  # nothing else holds blocks: it can never fit
                continue
            if block_ids is None:
                skipped.append(req)
                break
            if use_cache and self.kv.enable_prefix_caching:
                self.kv.stats.record(req.num_tokens, num_hit)  # once per admission, not per retry
            req.num_computed_tokens += num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
                req.first_scheduled_time = time.time()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            new_reqs.append(NewRequestData(
                req.request_id, req.prompt_token_ids, list(req.all_token_ids), req.sampling_params,
                self.kv.block_ids(req.request_id), req.num_computed_tokens))
            num_scheduled[req.request_id] = num_new
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _victim_index(self, i: int) -> int:
        """Index of the request to preempt for ``running[i]``: the newest one after it (under
        pipeline parallelism, the newest not in flight), else ``i`` itself."""
        for j in range(len(self.running) - 1, i, -1):
            if self.config.async_scheduling or self.running[j].request_id not in self.in_flight:
                return j
        return i

    def _num_new_running(self, req: Request, budget: int) -> int:
        """Tokens to compute for a running request this step (0: skip it)."""
        if req.request_id not in self.in_flight:
            return self._num_new_tokens(req, budget)
        if not self.config.async_scheduling or self.in_flight.num_steps(req.request_id) > 1:
            return 0  # one step ahead at most
        if req.grammar is not None and not self.config.defer_grammar:
            return 0  # its mask needs the tokens in flight, and the mask cannot come later
        if self.ahead is not None and self.ahead.applies(req):
            num = self.ahead.reserve(req, budget, len(self.running))
            if num is not None:
                return num
        pending = self.in_flight.samples_ahead(req.request_id)  # placeholders: ids on the device
        if pending:
            params = req.sampling_params
            if params.max_tokens is not None and req.num_output_tokens + pending >= params.max_tokens:
                return 0  # the step in flight ends it
            if req.num_tokens + pending >= self.config.max_model_len:
                return 0
        return self._num_new_tokens(req, budget,
                                    already=self.in_flight.tokens_ahead(req.request_id) - pending)

    def _drafts(self, req: Request, num_new: int, budget: int) -> list[int]:
        """The draft tokens a decoding request verifies this step (cut to fit the budget, the
        context and ``max_tokens``). Steps ahead (async scheduling, pipeline stages) take none:
        their verification would need the accepted count before the next launch (async
        scheduling reserves drafts for them instead, spec_ahead.py)."""
        drafts = req.spec_token_ids
        if not drafts or num_new != 1 or req.num_computed_tokens != req.num_tokens - 1:
            return []
        if req.sampling_params.needs_penalties:
            return []  # penalties per row would need the drafts' counts: plain decode
        if req.request_id in self.in_flight or self.config.pipeline_parallel_size > 1:
            return []
        room = min(budget - num_new, self.config.max_model_len - req.num_tokens)
        if req.sampling_params.max_tokens is not None:
            room = min(room, req.sampling_params.max_tokens - req.num_output_tokens - 1)
        return list(drafts[:max(room, 0)])

    def _num_new_tokens(self, req: Request, budget: int, already: int = 0) -> int:
        num_new = req.num_tokens - req.num_computed_tokens - already
        if num_new > budget and not self.config.enable_chunked_prefill:
            return 0
        return min(num_new, budget)

    def _finish_outgrown(self, req: Request) -> None:
        self._finish(req, RequestStatus.FINISHED_LENGTH)
        self.finished_outputs.append(EngineCoreOutput(req.request_id, [], "length"))

    def take_finished_outputs(self) -> list[EngineCoreOutput]:
        """Requests the scheduler itself ended (they outgrew the KV cache), for the front end."""
        outputs, self.finished_outputs = self.finished_outputs, []
        return outputs

    def _waits_for_sibling(self, req: Request) -> bool:
        sibling = self.requests.get(req.wait_for) if req.wait_for else None
        if sibling is None or sibling.is_finished:
            return False
        return sibling.num_computed_tokens < sibling.num_prompt_tokens - 1

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        release_slot(self, req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        # Results of its steps still in flight (async scheduling) are dropped when they come.
        self.in_flight.drop(req.request_id)
        req.num_preemptions += 1
        req.spec_token_ids = []
        self.kept_blocks.pop(req.request_id, None)
        self.waiting.appendleft(req)
        self.preempted_ids.add(req.request_id)  # the runner drops its state; resumes as new

    # -- after the model ran ---------------------------------------------------------------

    def update(self, sched: SchedulerOutput, result) -> list[EngineCoreOutput]:
        """Advance computed counts, append accepted tokens, and finish requests that stop.

        ``result``: the step's ``ModelRunnerOutput`` (or just its ``sampled`` map: request id ->
        accepted tokens, absent for partial prefills). The outputs leave whole, logprobs in.
        A request that verified k drafts and accepted ``a`` tokens computed ``k - (a - 1)``
        slots too many: they are given back (``BlockManager.truncate``) and never published.
        """
        if not isinstance(result, ModelRunnerOutput):
            result = ModelRunnerOutput(dict(result))
        outputs = []
        dropped = self.in_flight.retire(sched)
        for rid, num in sched.num_scheduled_tokens.items():
            if rid in dropped:  # preempted while this step ran: recomputed later
                continue
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue  # aborted, or stopped by an earlier step, while this one ran
            new_tokens = result.sampled.get(rid)
            rejected = 0
            computed, num_drafts = computed_and_drafts(sched, result, rid, num)
            if num_drafts and new_tokens:
                rejected = num_drafts - (len(new_tokens) - 1)
            req.num_computed_tokens += computed - rejected
            if rejected or computed != num:  # slots past what its steps may still write go back
                keep = req.num_computed_tokens + self.in_flight.tokens_ahead(rid) + self.config.num_lookahead_tokens
                give_back(self.kv, req, keep, self.kept_blocks)
            self.kv.publish_full_blocks(req, min(req.num_computed_tokens, req.num_tokens))
            if not new_tokens:
                continue
            if num_drafts:
                self.spec_stats.observe(num_drafts, len(new_tokens) - 1)
            req.spec_token_ids = result.spec_token_ids.get(rid, [])
            outputs.append(self._append(req, new_tokens, result))
        return outputs

    def _append(self, req: Request, new_tokens: list[int], result: ModelRunnerOutput) -> EngineCoreOutput:
        rid = req.request_id
        appended = []
        for tok in new_tokens:
            req.append_token(tok)
            appended.append(tok)
            if req.grammar is not None and not req.grammar.accept(tok):
                req.stop_reason = "grammar"  # never with the mask applied; a safety net
                self._finish(req, RequestStatus.FINISHED_STOPPED)
                break
            status = self._check_stop(req, tok)
            if status is not None:
                self._finish(req, status)
                break
        first = len(appended) == req.num_output_tokens
        logprobs = result.logprobs.get(rid)
        return EngineCoreOutput(rid, appended, req.status.finish_reason, req.stop_reason,
                                logprobs[:len(appended)] if logprobs is not None else None,
                                result.prompt_logprobs.get(rid),
                                num_cached_tokens=max(req.num_cached_tokens, 0),
                                first_scheduled_time=req.first_scheduled_time if first else None)

    def _check_stop(self, req: Request, token: int) -> Optional[RequestStatus]:
        params = req.sampling_params
        if req.num_output_tokens > params.min_tokens:  # the sampler masked these before
            if token in req.eos_token_ids and not params.ignore_eos:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if req.grammar is not None and req.grammar.is_terminated:
            return RequestStatus.FINISHED_STOPPED  # the grammar accepted its stop token
        if params.max_tokens is not None and req.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        release_slot(self, req)
        self.kept_blocks.pop(req.request_id, None)
        self.finished_ids.add(req.request_id)
        del self.requests[req.request_id]

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.kv.usage,
                              self.num_preemptions_total, self.kv.stats.queries, self.kv.stats.hits,
                              self.spec_stats.copy() if self.spec_stats.num_drafts else None)

