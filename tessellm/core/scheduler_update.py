"""The scheduler after the model ran: advance computed counts, append accepted tokens, stop.

A mixin of ``Scheduler`` (tessellm/core/scheduler.py), which owns the state it reads and
writes: ``requests``, ``kv`` (the BlockManager), ``in_flight``, ``config``, ``kept_blocks``,
``spec_stats``, and ``_finish`` (a request leaves ``running``/``waiting`` and frees its blocks).
Plain Python, no torch.
"""

from __future__ import annotations

from typing import Optional

from tessellm.core.engine_output import EngineCoreOutput
from tessellm.core.request import Request, RequestStatus
from tessellm.core.spec_ahead import computed_and_drafts, give_back
from tessellm.core.step import ModelRunnerOutput, SchedulerOutput


def _schedule_times(req: Request) -> dict:
    """A request's queue and first-schedule stamps and where its prompt's KV came from, for
    its first output."""
    return {"first_scheduled_time": req.first_scheduled_time, "queued_ts": req.queued_ts,
            "scheduled_ts": req.scheduled_ts, "num_external_computed_tokens": req.num_external_tokens,
            "num_recomputed_tokens": req.num_recomputed_tokens}


class SchedulerUpdate:
    """``Scheduler.update`` and what it needs: accepted tokens in, outputs and stops out."""

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
            if rid in result.kv_load_failed:
                self._recompute_failed_load(req)
                continue
            if rid in result.failed:  # a custom logits processor raised in its step
                outputs.append(self._failed(req, result.failed[rid]))
                continue
            if self.connector is not None:  # its loads (if any) worked: counted now
                self.connector.stats.confirm(rid)
            new_tokens = result.sampled.get(rid)
            rejected = 0
            computed, num_drafts = computed_and_drafts(sched, result, rid, num)
            if num_drafts and new_tokens:
                rejected = num_drafts - (len(new_tokens) - 1)
            start = req.num_computed_tokens
            req.num_computed_tokens += computed - rejected
            if rid in sched.state_saves_if_accepted:  # snapshots past rejected drafts go
                self.kv.settle_state_saves(req, sched.state_saves_if_accepted[rid], start,
                                           req.num_computed_tokens)
            if rejected or computed != num:  # slots past what its steps may still write go back
                keep = req.num_computed_tokens + self.in_flight.tokens_ahead(rid) + self.config.num_lookahead_tokens
                give_back(self.kv, req, keep, self.kept_blocks)
            self.kv.publish_full_blocks(req, min(req.num_computed_tokens, req.num_tokens))
            pooled = result.pooled.get(rid)
            if pooled is not None:  # a pooling request ends with its prompt: no token sampled
                outputs.append(self._pooled(req, pooled))
                continue
            if not new_tokens:
                continue
            if num_drafts:
                self.spec_stats.observe(num_drafts, len(new_tokens) - 1)
            req.spec_token_ids = result.spec_token_ids.get(rid, [])
            outputs.append(self._append(req, new_tokens, result))
        if result.kv_loads_finished:  # background KV loads (scheduler_kv_loads.py)
            self.finish_kv_loads(result.kv_loads_finished)
        if result.kv_saves and self.connector is not None:  # saves settled on the workers
            self.connector.stats.record_saves(result.kv_saves)
        return outputs

    def _recompute_failed_load(self, req: Request) -> None:
        """A KV connector's load for ``req`` failed on some rank: its blocks hold anything, so
        this step's result is dropped and it starts over from its tokens, without the
        connector (as a preemption: blocks freed, back at the front of ``waiting``)."""
        req.kv_load_failed = True
        req.num_cached_tokens = -1  # counted again when it is admitted again
        self.connector.request_failed_load(req)
        self.connector.stats.record_failed_load(req.request_id)
        if req in self.running:
            self.running.remove(req)
        self._preempt(req)

    def _append(self, req: Request, new_tokens: list[int], result: ModelRunnerOutput) -> EngineCoreOutput:
        rid = req.request_id
        appended = []
        for tok in new_tokens:
            if req.grammar is not None and not req.grammar.accept(tok):
                # The mask allowed nothing the sampler could take (e.g. min_tokens held back the
                # only token the grammar allowed, EOS): the token is arbitrary and never output.
                req.stop_reason = "grammar"
                self._finish(req, RequestStatus.FINISHED_STOPPED)
                break
            req.append_token(tok)
            appended.append(tok)
            status = self._check_stop(req, tok)
            if status is not None:
                self._finish(req, status)
                break
        first = len(appended) == req.num_output_tokens
        logprobs = result.logprobs.get(rid)
        return EngineCoreOutput(rid, appended, req.status.finish_reason, req.stop_reason,
                                logprobs[:len(appended)] if logprobs is not None else None,
                                result.prompt_logprobs.get(rid),
                                result.prompt_token_id_logprobs.get(rid),
                                num_cached_tokens=max(req.num_cached_tokens, 0),
                                kv_transfer_params=req.kv_transfer_params_out,
                                num_nans_in_logits=result.num_nans_in_logits.get(rid, 0),
                                **(_schedule_times(req) if first else {}))

    def _failed(self, req: Request, error: str) -> EngineCoreOutput:
        """The request ends with vLLM's finish reason "error" (an internal failure, not the
        client's abort), ``error`` its stop_reason; nothing of the step is output (its first
        output, before any token: with its queue and schedule stamps)."""
        req.stop_reason = error
        self._finish(req, RequestStatus.FINISHED_ERROR)
        return EngineCoreOutput(req.request_id, [], "error", error,
                                num_cached_tokens=max(req.num_cached_tokens, 0),
                                **(_schedule_times(req) if req.num_output_tokens == 0 else {}))

    def _pooled(self, req: Request, pooled: list[float]) -> EngineCoreOutput:
        self._finish(req, RequestStatus.FINISHED_STOPPED)  # frees its blocks now
        return EngineCoreOutput(req.request_id, [], "stop", pooled=pooled,
                                num_cached_tokens=max(req.num_cached_tokens, 0), **_schedule_times(req))

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
        if req.repetition is not None:  # vLLM's order: after the length checks
            repeated = req.repetition.add(req.all_token_ids, req.num_prompt_tokens)
            if repeated and req.num_output_tokens >= params.min_tokens:
                req.stop_reason = "repetition_detected"
                return RequestStatus.FINISHED_REPETITION
        return None
