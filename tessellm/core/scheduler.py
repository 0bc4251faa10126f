"""Continuous-batching scheduler: a token budget per step over running and waiting requests.

Plain Python, no torch. Each step it decides, per request, how many new tokens to compute;
prefill chunks and decode tokens share one flat batch.

Invariants
----------
* A request is in exactly one of ``waiting`` (WAITING or PREEMPTED) or ``running``.
* ``num_computed_tokens <= num_tokens``; a request samples a token in a step exactly when the
  step brings ``num_computed_tokens`` up to ``num_tokens`` (chunks before that only fill K/V).
* Per step: sum of scheduled tokens <= ``max_num_batched_tokens``; running <= ``max_num_seqs``.
* Running requests are served in order: oldest first under the ``fcfs`` policy, by
  ``(priority, arrival_time)`` under ``priority`` (``running`` is kept sorted so, and
  ``waiting`` is a heap on that key: core/request_queue.py). When blocks run out, the last
  running request in that order (the newest; the lowest-priority) is preempted (its blocks
  freed, ``num_computed_tokens`` reset) and put back in ``waiting`` (at the front; in its place
  by priority); it is recomputed later from its tokens, so its results are unchanged.
* No waiting request is admitted in a step that preempted (it would only be preempted again).
* ``deferred`` holds the ids of the waiting requests that were last passed over for a reason of
  their own (vLLM's ``skipped_waiting``: a KV connector load or lookup under way, a grammar
  still compiling, a LoRA slot, a sibling's prefill), not for the step's capacity (blocks,
  budget, ``max_num_seqs``); a request leaves it when it is taken again, so it is counted once
  per step without a pass over the queue (``stats``: vLLM's waiting reasons).
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
* Recurrent-state models with prefix caching (``kv.states``, ``core/state_prefix.py``): prefill
  chunks end on block boundaries where they can, a chunk ending on one saves the state there
  (``state_saves``) and a prefix hit starts from the snapshot it ends at (``state_restores``).
"""

from __future__ import annotations

import bisect
import time
from typing import Iterable, Optional

from tessellm.core.block_manager import BlockManager
from tessellm.core.engine_output import EngineCoreOutput
from tessellm.core.in_flight import InFlightSteps
from tessellm.core.request import Request, RequestStatus
from tessellm.core.request_queue import make_queue, priority_key
from tessellm.core.scheduler_config import SchedulerConfig, SchedulerStats, check_prompt_fits  # noqa: F401
from tessellm.core.scheduler_kv_loads import SchedulerKVLoads
from tessellm.core.scheduler_update import SchedulerUpdate
from tessellm.core.spec_ahead import SpecAhead
from tessellm.core.state_prefix import align_chunk, saves_at, saves_within
from tessellm.core.step import (CachedRequestData, ModelRunnerOutput, NewRequestData,  # noqa: F401
                                SchedulerOutput)
from tessellm.spec_decode.metrics import SpecDecodeStats
from tessellm.lora.scheduling import LORA_WAIT, acquire_slot, lora_stats, lora_step_fields, release_slot
from tessellm.multimodal.encoder_budget import end_outside_images, make_encoder_budget


class Scheduler(SchedulerUpdate, SchedulerKVLoads):
    """Step-by-step admission, budgets and preemption (here); ``update`` after the model ran
    is in scheduler_update.py, the configuration and stats in scheduler_config.py."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.kv = block_manager
        self.requests: dict[str, Request] = {}
        self.waiting = make_queue(config.policy)  # FCFSQueue or PriorityQueue
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
        self.encoder = make_encoder_budget(config)  # image models: the vision encoder's budget
        self.connector = None  # a KV connector's scheduler half (--kv-transfer-config), or None
        self.kv_loading: dict[str, Request] = {}  # its background loads under way (scheduler_kv_loads.py)
        self.kv_lookups: set[str] = set()  # requests whose connector lookup is under way, off the step
        self.deferred: set[str] = set()  # waiting, last passed over for a reason of their own

    # -- admission -------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.check_fits(request)
        self.requests[request.request_id] = request
        request.queued_ts = time.monotonic()
        self.waiting.add(request)

    def check_fits(self, request: Request) -> None:
        """Refuse a request that could never run, before it is queued."""
        check_prompt_fits(request.num_prompt_tokens, self.config.max_model_len,
                          self.kv.num_blocks * self.kv.block_size, 0 if self.config.pooling else 1)
        if self.encoder is not None:
            self.encoder.check_fits(request.mm_features)

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

    def kv_lookups_pending(self) -> bool:
        """Waiting requests whose KV connector lookup is under way (nothing else may run)."""
        return bool(self.kv_lookups)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.kv_loading)

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
        if self.encoder is not None:
            self.encoder.begin(self.running, self._next_position)
        saves: dict[str, int] = {}  # recurrent-state snapshots (state_prefix.py)
        restores: dict[str, int] = {}
        saves_if_accepted: dict[str, list] = {}  # ... at boundaries a verify step may cross
        within: dict[str, list] = {}  # ... at boundaries inside a prefill chunk

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            ahead = self.in_flight.tokens_ahead(req.request_id)  # scheduled, after the computed ones
            num_new, images = self._fit_images(req, req.num_computed_tokens + ahead,
                                               self._align(req, req.num_computed_tokens + ahead,
                                                           self._num_new_running(req, budget)), True)
            if num_new == 0:
                i += 1
                continue
            drafts = self._drafts(req, num_new, budget, len(spec))
            num_new += len(drafts)
            lookahead = self._lookahead(req.num_computed_tokens + ahead + num_new)
            new_block_ids = self.kv.allocate(req, ahead + num_new + lookahead)
            while new_block_ids is None:
                if self.connector is not None and self._free_waiting_blocks(req):
                    new_block_ids = self.kv.allocate(req, ahead + num_new + lookahead)
                    continue  # a loaded request waiting to run gave its blocks back
                j = self._victim_index(i)  # the newest request after req that may be preempted
                if j == i and len(self.running) == 1:
                    if self.kv_loading:
                        break  # background loads hold blocks: it waits for them to end
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
            self._save_state(req, start, num_new, saves, saves_if_accepted,
                             bool(drafts) or reserved is not None, within)
            if images:
                self.encoder.take(req, images)
            if reserved is not None:
                reserved_drafts[req.request_id] = reserved
            if drafts:
                spec[req.request_id] = drafts
                req.spec_token_ids = []  # they belong to this step now
            budget -= num_new
            i += 1

        if not preempted:
            budget = self._admit_waiting(budget, num_scheduled, new_reqs, saves, restores, within)

        self.num_preemptions_total += preempted
        out = SchedulerOutput(new_reqs, cached_reqs, num_scheduled, sum(num_scheduled.values()),
                              self._num_sampled(num_scheduled, spec, reserved_drafts), spec,
                              spec_ahead=reserved_drafts, kept_blocks=self.kept_blocks,
                              finished_request_ids=self.finished_ids,
                              preempted_request_ids=self.preempted_ids,
                              encoder_inputs=self.encoder.encoded if self.encoder else {},
                              state_saves=saves, state_restores=restores,
                              state_saves_if_accepted=saves_if_accepted,
                              state_saves_within=within)
        if self.kv.host is not None and self.kv.host.transfers and not out.is_empty:
            out.kv_transfers = self.kv.host.take_transfers()  # before this step's forward
        if self.connector is not None and not out.is_empty:
            out.kv_connector_meta = self._with_check(
                self.connector.build_connector_meta(out, self.requests, self.kv.block_ids))
        if self.lora is not None:
            lora_step_fields(self, out)
        self.num_scheduled_tokens_total += out.total_num_scheduled_tokens
        if not out.is_empty:
            self.in_flight.add(out)
            # Sent. An empty step is not: what ended or was cut waits for the next one, or the
            # runner would keep an ended request's state and block-table row.
            self.kept_blocks = {}
            self.finished_ids, self.preempted_ids = set(), set()
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
                       new_reqs: list[NewRequestData], saves: dict[str, int],
                       restores: dict[str, int], within: Optional[dict[str, list]] = None) -> int:
        skipped: list[Request] = []
        if self.lora is not None:
            self.lora.begin_admission()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.take()
            self.deferred.discard(req.request_id)
            if req.kv_loading or self._waits_for_sibling(req) or (req.grammar is not None
                                                                  and not req.grammar.ready):
                self._defer(req, skipped)  # its KV loads, its grammar still compiles: others go ahead
                continue
            if req.grammar is not None and req.grammar.error is not None:
                req.stop_reason = req.grammar.error  # the front end's refusal (a 400), as LoRA's
                self._finish(req, RequestStatus.FINISHED_ABORTED)
                self.finished_outputs.append(EngineCoreOutput(req.request_id, [], "abort",
                                                              req.stop_reason))
                continue
            lora = acquire_slot(self, req) if req.lora_request is not None else 0
            if lora < 0:  # its adapter is loading or every slot is busy: it waits; or it failed
                if lora == LORA_WAIT:
                    self._defer(req, skipped)
                continue
            # Prompt logprobs and per-token pooling need every prompt position computed.
            use_cache = req.num_computed_tokens == 0 and not req.computes_every_prompt_token
            prefix = self.kv.find_cached_prefix(req, count=False) if use_cache else []
            offloaded = self.kv.find_offloaded(req, len(prefix)) if use_cache else []
            num_hit = (len(prefix) + len(offloaded)) * self.kv.block_size
            ext = self._num_external(req, num_hit) if use_cache else (0, False)
            if ext is None:  # the connector looks it up off the step: others go ahead
                release_slot(self, req)
                self._defer(req, skipped)
                continue
            num_ext, load_async = ext
            num_hit += num_ext
            if num_ext and load_async:  # loaded in the background; it waits in its place
                if self._start_kv_load(req, prefix, offloaded, num_hit, num_ext):
                    release_slot(self, req)  # taken again when it runs
                    self._defer(req, skipped)
                    continue
                if self.running or self.kv_loading or self._free_waiting_blocks(req):
                    release_slot(self, req)
                    skipped.append(req)
                    break
                num_hit, num_ext = num_hit - num_ext, 0  # nothing else holds blocks: as below
            cut = self.kv.state_cut(req, len(prefix)) if use_cache else 0
            num_new, images = self._fit_images(req, req.num_computed_tokens + num_hit,
                                               self._align(req, req.num_computed_tokens + num_hit,
                                                           self._num_new_tokens(req, budget,
                                                                                already=num_hit),
                                                           cut),
                                               False)
            block_ids = (self.kv.allocate(req, num_ext + num_new + self._lookahead(
                req.num_computed_tokens + num_hit + num_new), prefix, offloaded)
                         if num_new else None)
            if block_ids is None:
                release_slot(self, req)
            if num_new == 0:
                skipped.append(req)
                break
            if (block_ids is None and not self.running and not self.kv_loading
                    and not self._free_waiting_blocks(req)):
                self._finish_outgrown(req)  # nothing else holds blocks: it can never fit
                continue
            if block_ids is None:
                skipped.append(req)
                break
            if use_cache and self.kv.enable_prefix_caching:  # once per admission, not per retry
                self.kv.stats.record(req.num_tokens, len(prefix) * self.kv.block_size)
                if self.kv.host is not None:  # vLLM's external prefix cache: the host tier
                    self.kv.host.stats.queries += req.num_tokens
                    self.kv.host.stats.hits += len(offloaded) * self.kv.block_size
                if self.connector is not None and not req.kv_load_failed:  # it was asked
                    self.connector.stats.record_lookup(req.request_id, req.num_tokens, num_ext)
            if self.connector is not None:  # its blocks after the device and host-tier hit
                first = (num_hit - num_ext) // self.kv.block_size
                self.connector.update_state_after_alloc(req, self.kv.block_ids(req.request_id), first,
                                                        num_ext // self.kv.block_size)
            if prefix and self.kv.states is not None:  # its state starts from the hit's snapshot
                restores[req.request_id] = prefix[-1].state_slot
                self.kv.states.touch(prefix[-1])
            req.num_computed_tokens += num_hit
            self._note_cached(req, num_hit, len(offloaded) * self.kv.block_size + num_ext)
            if req.scheduled_ts is None:  # its first admission (not again after a failed load)
                req.first_scheduled_time, req.scheduled_ts = time.time(), time.monotonic()
            req.status = RequestStatus.RUNNING
            if self.config.policy == "priority":  # running stays in the order it is served
                bisect.insort(self.running, req, key=priority_key)
            else:
                self.running.append(req)
            new_reqs.append(NewRequestData(
                req.request_id, req.prompt_token_ids, list(req.all_token_ids), req.sampling_params,
                self.kv.block_ids(req.request_id), req.num_computed_tokens, req.mm_features,
                req.pooling_task, req.prompt_embeds))
            num_scheduled[req.request_id] = num_new
            self._save_state(req, req.num_computed_tokens, num_new, saves, within=within, cut=cut)
            if images:
                self.encoder.take(req, images)
            budget -= num_new
        self.waiting.requeue_all(skipped)
        return budget

    def _defer(self, req: Request, skipped: list[Request]) -> None:
        """``req`` waits for a reason of its own (vLLM's "deferred"); others go ahead."""
        skipped.append(req)
        self.deferred.add(req.request_id)

    def _num_external(self, req: Request, num_hit: int) -> Optional[tuple[int, bool]]:
        """Tokens the KV connector loads after a hit of ``num_hit`` (whole blocks, never the
        last prompt token; none for a request whose earlier load failed), and whether it loads
        them in the background; None while the connector's lookup is under way (off the step:
        the request is asked about again at its next admission attempt)."""
        if self.connector is None or req.kv_load_failed or not self.kv.enable_prefix_caching:
            return 0, False
        num = self.connector.get_num_new_matched_tokens(req, num_hit)
        num, load_async = num if isinstance(num, tuple) else (num, False)
        if num is None:
            self.kv_lookups.add(req.request_id)
            return None
        self.kv_lookups.discard(req.request_id)
        limit = ((req.num_tokens - 1) // self.kv.block_size) * self.kv.block_size - num_hit
        return max(0, min(num - num % self.kv.block_size, limit)), bool(load_async)
    def _align(self, req: Request, start: int, num_new: int, cut: int = 0) -> int:
        """A prefill chunk cut to end on a block boundary where it can (recurrent-state
        snapshots, ``state_prefix.align_chunk``), and at ``cut`` when it passes it (where its
        cached KV blocks end past its snapshot hit: ``BlockManager.state_cut``); unchanged
        without snapshots."""
        if self.kv.states is None or num_new == 0 or self.kv.states.within:
            return num_new  # saves inside the step (``_save_state``): no cut needed
        if start < cut < start + num_new:
            num_new = cut - start
        return align_chunk(start, num_new, req.num_tokens, self.kv.block_size, self.kv.states.every)

    def _save_state(self, req: Request, start: int, num_new: int, saves: dict[str, int],
                    saves_if_accepted: Optional[dict[str, list]] = None,
                    verifies: bool = False, within: Optional[dict[str, list]] = None,
                    cut: int = 0) -> None:
        """Reserve a snapshot of the request's state after this chunk when it ends on a
        boundary a later hit may end at (``state_prefix.saves_at``), or after a decode token
        that fills a block (the request's one rolling decode snapshot: a next chat turn, its
        prompt this request's tokens and more, hits up to there). Under speculation a decoding
        step (``verifies``: it carries drafts, or reserves them a step ahead) reserves one at
        each boundary its tokens cross, kept only if the token before it is accepted
        (``saves_if_accepted``, ``BlockManager.settle_state_saves``). A prefill chunk also
        reserves one at each boundary inside it worth a snapshot (``within``:
        ``state_prefix.saves_within``; ``cut``: ``BlockManager.state_cut``), saved by the
        step's ops where they pass it."""
        if self.kv.states is None:
            return
        bs = self.kv.block_size
        index = saves_at(start, num_new, req.num_tokens, bs)
        end = start + num_new
        decoding = index is None and (verifies or (
            num_new == 1 and end == req.num_tokens + self.in_flight.samples_ahead(req.request_id)))
        if within is not None and self.kv.states.within and not decoding and num_new > 1:
            pairs = []
            for n in saves_within(start, num_new, req.num_tokens, bs, self.kv.states.every, cut):
                slot = self.kv.reserve_state_save(req, n // bs - 1)
                if slot is not None:
                    pairs.append([n, slot])
            if pairs:
                within[req.request_id] = pairs
        if decoding and self.config.num_speculative_tokens:
            if saves_if_accepted is not None:
                self._save_state_if_accepted(req, start, end, saves_if_accepted)
            return
        decode = decoding and end % bs == 0
        if decode:
            index = end // bs - 1
        slot = None if index is None else self.kv.reserve_state_save(req, index, rolling=decode)
        if slot is not None:
            saves[req.request_id] = slot

    def _save_state_if_accepted(self, req: Request, start: int, end: int,
                                saves_if_accepted: dict[str, list]) -> None:
        """A decoding step under speculation computes tokens up to ``end - 1``, some of them
        drafts, from ``start`` (a step ahead may start earlier, the step in flight may accept
        fewer than all its drafts: from the request's computed tokens, yet not before its last
        known token): a snapshot slot at
        each block boundary in between (``[[n, slot], ...]``: the state after ``n`` tokens),
        which the runner fills from the step's per-token state where it computes token
        ``n - 1`` and the scheduler keeps once that token is accepted::

            block_size 4, 9 computed, verify [t9 d0 d1 d2] (tokens 9 .. 12): boundary 12, the
            state after token 11 (d1): kept when d0 and d1 are accepted
        """
        bs = self.kv.block_size
        pairs = []
        first = min(start, max(req.num_computed_tokens, req.num_tokens - 1))  # its earliest start
        for n in range((first // bs + 1) * bs, end + 1, bs):
            slot = self.kv.reserve_save_if_accepted(req, n // bs - 1)
            if slot is not None:
                pairs.append([n, slot])
        if pairs:
            saves_if_accepted[req.request_id] = pairs

    def _victim_index(self, i: int) -> int:
        """Index of the request to preempt for ``running[i]``: the last one after it (the
        newest; under the priority policy the lowest-priority; under pipeline parallelism the
        last not in flight), else ``i`` itself."""
        for j in range(len(self.running) - 1, i, -1):
            if self.config.async_scheduling or self.running[j].request_id not in self.in_flight:
                return j
        return i

    def _lookahead(self, num_tokens: int) -> int:
        """KV slots kept past a request's first ``num_tokens`` for a draft model's guesses
        (``num_lookahead_tokens``), none past the context: the block tables hold
        ``max_model_len`` tokens, and a drafter writes no position beyond it (``room``)."""
        return max(0, min(self.config.num_lookahead_tokens, self.config.max_model_len - num_tokens))

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

    def _drafts(self, req: Request, num_new: int, budget: int, verifying: int = 0) -> list[int]:
        """The draft tokens a decoding request verifies this step (cut to fit the budget, the
        context and ``max_tokens``). Steps ahead (async scheduling, pipeline stages) take none:
        their verification would need the accepted count before the next launch (async
        scheduling reserves drafts for them instead, spec_ahead.py). ``verifying``: requests
        given drafts so far this step; at most ``disable_by_batch_size - 1`` are (drafts held
        from different steps, a request skipped in the step after it drafted, would otherwise
        exceed the rows the memory profile reserves: ``SpeculativeConfig.max_verifying_seqs``)."""
        drafts = req.spec_token_ids
        if not drafts or num_new != 1 or req.num_computed_tokens != req.num_tokens - 1:
            return []
        limit = self.config.disable_by_batch_size
        if limit and verifying >= limit - 1:
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

    def _next_position(self, req: Request) -> int:
        return req.num_computed_tokens + self.in_flight.tokens_ahead(req.request_id)

    def _fit_images(self, req: Request, start: int, num_new: int,
                    held_by_runner: bool) -> tuple[int, list]:
        """``num_new`` cut where the chunk would reach an image over the encoder budget, and
        the images it reaches first (tessellm.multimodal.encoder_budget)."""
        if self.encoder is None or not req.mm_features or num_new == 0:
            return num_new, []
        if self.config.disable_chunked_mm_input:
            num_new = end_outside_images(req.mm_features, start, num_new)
            if num_new == 0:
                return 0, []
        whole = not held_by_runner and not self.config.enable_chunked_prefill
        return self.encoder.fit(req, start, num_new, held_by_runner, whole)

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
        self.waiting.requeue(req)
        self.preempted_ids.add(req.request_id)  # the runner drops its state; resumes as new

    def preempt_running(self) -> int:
        """Preempt every running request that may be (all of them, but under pipeline
        parallelism one in flight; vLLM's ``reset_prefix_cache(reset_running_requests=True)``):
        their blocks are freed and each is recomputed later from its tokens, so its results are
        unchanged. Newest first, so the oldest ends at the front of ``waiting``. How many."""
        victims = [r for r in reversed(self.running)
                   if self.config.async_scheduling or r.request_id not in self.in_flight]
        for req in victims:
            self.running.remove(req)
            self._preempt(req)
        self.num_preemptions_total += len(victims)
        return len(victims)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if not req.kv_loading:  # a background load's blocks go once it is reported
            self.kv.free(req)
        release_slot(self, req)
        self.kept_blocks.pop(req.request_id, None)
        self.finished_ids.add(req.request_id)
        self.deferred.discard(req.request_id)
        del self.requests[req.request_id]
        if self.connector is not None:
            self.kv_lookups.discard(req.request_id)
            self.connector.stats.request_finished(req.request_id)
            params = self.connector.request_finished(req)
            req.kv_transfer_params_out = params if isinstance(params, dict) else None

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.kv.usage,
                              self.num_preemptions_total, self.kv.stats.queries, self.kv.stats.hits,
                              self.spec_stats.copy() if self.spec_stats.num_drafts else None,
                              None if self.kv.host is None else self.kv.host.stats_dict(),
                              None if self.connector is None else self.connector.stats.as_dict(),
                              None if self.kv.states is None else self.kv.states.stats_dict(),
                              None if self.lora is None else lora_stats(self),
                              num_waiting_deferred=len(self.deferred))
