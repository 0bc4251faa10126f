"""Front end, outbound: core token ids to RequestOutputs (detokenize, stop strings, logprobs).

A stop string is found here, after detokenization; the request is then finished here and its
id returned so the caller aborts it in the core (freeing its blocks).

Given an ``IterationStats``, ``process`` and ``abort`` also record what the metrics need: each
sample's token arrival times and how it finished (``tessellm.metrics.stats``). Each sample's
times (``RequestStateStats``, the request's ``RequestOutput.metrics``) are kept in any case.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from tessellm.core.detokenizer import IncrementalDetokenizer
from tessellm.core.outputs import CompletionOutput, GrowingPrefix, Logprob, RequestOutput
from tessellm.core.sampling_params import RequestOutputKind, SamplingParams
from tessellm.core.engine_output import EngineCoreOutput
from tessellm.metrics.stats import IterationStats, RequestStateStats


@dataclass
class _Sample:
    """One of a request's n samples."""

    index: int
    core_id: str
    detok: Optional[IncrementalDetokenizer]
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None
    times: Optional[RequestStateStats] = None  # for the metrics and RequestOutput.metrics
    num_cached_tokens: int = 0  # its own prompt tokens not computed (a sibling's may differ)
    # output_kind DELTA: how much of the tokens, logprobs and text earlier outputs carried
    sent_tokens: int = 0
    sent_text: int = 0


@dataclass
class _RequestState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    prompt_logprobs: Optional[list] = None
    num_cached_tokens: int = 0
    pooling: Optional[object] = None  # a pooling request's PoolingParams (normalize resolved)
    pooled: Optional[list] = None  # its raw pooled vector from the core, once it came
    lora_request: Optional[object] = None  # its adapter, shown on its outputs
    sent_prompt_logprobs: bool = False  # output_kind DELTA: an earlier output carried them
    prompt_token_id_logprobs: Optional[object] = None  # numpy float32 [rows, ids], once it came
    sent_prompt_token_id_logprobs: bool = False  # as sent_prompt_logprobs
    kv_transfer_params: Optional[dict] = None  # its KV connector's, with its finish

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


def _stopped_on_token(out: EngineCoreOutput, params: SamplingParams) -> bool:
    """The core stopped the sample on its last token (EOS, a stop token id, the grammar's end):
    as in vLLM, that token is in ``token_ids`` but not in the text, unless
    ``include_stop_str_in_output`` (with ``skip_special_tokens`` false, "</s>" would end it)."""
    return (out.finish_reason == "stop" and bool(out.new_token_ids) and not params.include_stop_str_in_output
            and (out.stop_reason is None or isinstance(out.stop_reason, int)))


class OutputProcessor:
    def __init__(self, tokenizer, final_only: bool = False):
        self.tokenizer = tokenizer
        self.final_only = final_only  # offline batches want finished outputs only
        self.states: dict[str, _RequestState] = {}
        self.core_to_parent: dict[str, tuple[str, int]] = {}

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, core_ids: list[str],
                    arrival_time: Optional[float] = None, pooling=None, lora_request=None) -> None:
        arrival = time.time() if arrival_time is None else arrival_time
        samples = []
        for i, cid in enumerate(core_ids):
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                               params.stop, params.include_stop_str_in_output,
                                               params.min_tokens)
            wants = params.num_logprobs is not None  # logprobs, or logprob_token_ids alone
            samples.append(_Sample(i, cid, detok, logprobs=[] if wants else None,
                                   cumulative_logprob=0.0 if wants else None,
                                   times=RequestStateStats(arrival_time=arrival,
                                                           num_prompt_tokens=len(prompt_token_ids))))
            self.core_to_parent[cid] = (request_id, i)
        self.states[request_id] = _RequestState(request_id, prompt, prompt_token_ids, params, samples,
                                                pooling=pooling, lora_request=lora_request)

    def has_request(self, request_id: str) -> bool:
        return request_id in self.states

    def core_ids(self, request_id: str) -> list[str]:
        state = self.states.get(request_id)
        return [s.core_id for s in state.samples] if state else []

    def abort(self, request_id: str, stats: Optional[IterationStats] = None) -> Optional[RequestOutput]:
        """Drop a request (client went away); returns its final output, marked aborted."""
        state = self.states.get(request_id)
        if state is None:
            return None
        for s in state.samples:
            if s.finish_reason is None:
                s.finish_reason = "abort"
                if stats is not None:
                    stats.observe_finished(s.times, "abort", state.params.max_tokens, s.num_cached_tokens,
                                           by_client=True)
        return self._finish(state)

    def process(self, outputs: list[EngineCoreOutput], stats: Optional[IterationStats] = None,
                core_timestamp: Optional[float] = None) -> tuple[list[RequestOutput], list[str]]:
        """Returns (updated RequestOutputs, core ids to abort because a stop string hit).

        ``stats``: filled in with the token counts, latencies and finished samples of this batch.
        ``core_timestamp``: the core's ``time.monotonic()`` when it made ``outputs`` (now, if
        not given): the samples' ``first_token_ts`` / ``last_token_ts``.
        """
        iteration = stats if stats is not None else IterationStats()  # the samples' times
        core_ts = time.monotonic() if core_timestamp is None else core_timestamp
        touched: dict[str, _RequestState] = {}
        to_abort: list[str] = []
        for out in outputs:
            parent = self.core_to_parent.get(out.request_id)
            if parent is None:
                continue  # finished here already (stop string) or aborted
            state = self.states[parent[0]]
            sample = state.samples[parent[1]]
            if sample.finish_reason is not None:
                continue  # n > 1: a stop string ended this sample; its abort is on the way
            num_kept = self._apply(state, sample, out)
            sample.times.observe_core(out, num_kept, core_ts)
            iteration.observe_output(sample.times, num_kept, out.first_scheduled_time, out.num_cached_tokens,
                                     out.num_external_computed_tokens, out.num_recomputed_tokens)
            if stats is not None and sample.finish_reason is not None:  # just now: later outputs are skipped above
                stats.observe_finished(sample.times, sample.finish_reason, state.params.max_tokens,
                                       sample.num_cached_tokens)
            if sample.finish_reason == "stop" and out.finish_reason is None:
                to_abort.append(out.request_id)
            touched[state.request_id] = state
        results = []
        for state in touched.values():
            if state.finished:
                if stats is not None:  # every sample finished in the core (an abort there too, as vLLM)
                    stats.observe_request_finished(len(state.samples),
                                                   [s.times.num_generation_tokens for s in state.samples])
                results.append(self._finish(state))
            elif not self.final_only and state.params.output_kind != RequestOutputKind.FINAL_ONLY:
                results.append(self._output(state))
        return results, to_abort

    def _apply(self, state: _RequestState, sample: _Sample, out: EngineCoreOutput) -> int:
        """Adds the output's tokens to the sample; returns how many it kept (a stop string in
        a step of several tokens, speculative decoding's, ends the sample at its last token)."""
        sample.num_cached_tokens = max(sample.num_cached_tokens, out.num_cached_tokens)
        state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
        if out.pooled is not None:
            state.pooled = out.pooled
        if out.kv_transfer_params is not None:
            state.kv_transfer_params = out.kv_transfer_params
        if out.prompt_logprobs is not None and state.prompt_logprobs is None:
            state.prompt_logprobs = [None] + [self._logprob_dict(e) for e in out.prompt_logprobs[1:]]
        if out.prompt_token_id_logprobs is not None and state.prompt_token_id_logprobs is None:
            state.prompt_token_id_logprobs = np.asarray(out.prompt_token_id_logprobs, dtype=np.float32)
        finished = out.finish_reason is not None
        new_ids, hit = out.new_token_ids, None
        if sample.detok is not None:
            text_ids = new_ids[:-1] if _stopped_on_token(out, state.params) else new_ids
            hit = sample.detok.add_tokens(text_ids, finished)
            if hit is not None:
                new_ids = new_ids[:sample.detok.num_kept]
        sample.token_ids.extend(new_ids)
        if out.logprobs and sample.logprobs is not None:
            by_ids = bool(state.params.logprob_token_ids)
            for entry in out.logprobs[:len(new_ids)]:
                sample.logprobs.append(self._ids_dict(entry) if by_ids else self._logprob_dict(entry))
                sample.cumulative_logprob += entry[1]
        if hit is not None:
            sample.finish_reason, sample.stop_reason = "stop", hit
        elif finished:
            sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
        return len(new_ids)

    def _logprob_dict(self, entry) -> dict[int, Logprob]:
        token, logprob, rank, top = entry
        result = {tid: Logprob(lp, r + 1, self._token_text(tid)) for r, (tid, lp) in enumerate(top)}
        result[token] = Logprob(logprob, rank, self._token_text(token))
        return result

    def _ids_dict(self, entry) -> dict[int, Logprob]:
        """vLLM's dict of a logprob_token_ids position: the sampled token first with its rank
        in the vocabulary, then each requested id with rank = its place in the list (1-based);
        a sampled token that is also requested takes the requested entry's rank, as in vLLM."""
        token, logprob, rank, top = entry
        result = {token: Logprob(logprob, rank, self._token_text(token))}
        for r, (tid, lp) in enumerate(top):
            result[tid] = Logprob(lp, r + 1, self._token_text(tid))
        return result

    def _token_text(self, token_id: int) -> Optional[str]:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id])

    def _output(self, state: _RequestState) -> RequestOutput:
        if state.pooling is not None:
            from tessellm.pooling.outputs import pooling_output

            return pooling_output(state)
        outs = [self._completion(state, s) for s in state.samples]
        prompt_logprobs, scores = state.prompt_logprobs, state.prompt_token_id_logprobs
        if state.params.output_kind == RequestOutputKind.DELTA:  # vLLM's: in the first output only
            prompt_logprobs = None if state.sent_prompt_logprobs else prompt_logprobs
            state.sent_prompt_logprobs = prompt_logprobs is not None or state.sent_prompt_logprobs
            scores = None if state.sent_prompt_token_id_logprobs else scores
            state.sent_prompt_token_id_logprobs = scores is not None or state.sent_prompt_token_id_logprobs
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outs,
                             state.finished, prompt_logprobs, state.num_cached_tokens,
                             metrics=state.samples[0].times, lora_request=state.lora_request,
                             kv_transfer_params=state.kv_transfer_params,
                             prompt_token_id_logprobs=scores)

    def _completion(self, state: _RequestState, s: _Sample) -> CompletionOutput:
        """One sample's output, a snapshot: nothing in it changes after it is returned. Its
        token ids and logprobs are the sample's lists up to now (``GrowingPrefix``), copied
        out only if read: a step's outputs cost O(1) per sample, not O(tokens so far)."""
        done = s.finish_reason is not None
        text = s.detok.visible_text(done) if s.detok is not None else ""
        ids, logprobs = s.token_ids, s.logprobs
        if state.params.output_kind == RequestOutputKind.DELTA:  # only what is new since the last
            text, ids = text[s.sent_text:], ids[s.sent_tokens:]
            logprobs = None if logprobs is None else logprobs[s.sent_tokens:]
            s.sent_text, s.sent_tokens = s.sent_text + len(text), len(s.token_ids)
        else:
            ids = GrowingPrefix(ids, len(ids))
            logprobs = None if logprobs is None else GrowingPrefix(logprobs, len(logprobs))
        return CompletionOutput(s.index, text, ids, s.cumulative_logprob, logprobs,
                                s.finish_reason, s.stop_reason, state.lora_request)

    def _finish(self, state: _RequestState) -> RequestOutput:
        result = self._output(state)
        result.finished = True
        del self.states[state.request_id]
        for s in state.samples:
            self.core_to_parent.pop(s.core_id, None)
        return result
