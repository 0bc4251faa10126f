"""The request-level series of ``EngineMetrics``: what the front end measures from the outputs
(``IterationStats``), per output and per finished request.

Per step the cost stays flat: a token-level observation per output (TTFT, ITL) as before; the
phase times, TPOT and request parameters are observed once per finished sequence or request.

Two series mean something else under vLLM's name than under tessellm's, so under ``vllm`` and
``both`` their ``vllm:`` copy is a histogram of its own (kept in ``NamedView.twins``):

- ``request_queue_time_seconds``: tessellm's is arrival at the front end to first scheduled;
  vLLM's is the core's queue only (``scheduled_ts - queued_ts``).
- ``iteration_tokens_total``: tessellm's is the tokens each engine step computed (prefill chunks
  plus decodes, cached tokens not); vLLM's is, per batch of outputs, the prompt tokens of the
  sequences that got their first token in it plus the output tokens in it.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import Counter, Histogram

from tessellm.metrics.buckets import (ITERATION_TOKEN_BUCKETS, ITL_BUCKETS, N_PARAM_BUCKETS,
                                      REQUEST_SECONDS_BUCKETS, TTFT_BUCKETS)
from tessellm.metrics.corrupted_log import CorruptedLog
from tessellm.metrics.names import PREFIX
from tessellm.metrics.stats import FinishedRequest, IterationStats, PromptTokenStats

FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")  # vLLM's label values (FinishReason)

# family (no prefix) -> (doc, tessellm's buckets or "tokens"), observed per finished sequence
# from the FinishedRequest field of the same name as the dict's third element
_PHASES = {
    "request_prefill_time_seconds": ("Scheduled to the first token, in the engine core (vLLM's "
                                     "PREFILL phase).", REQUEST_SECONDS_BUCKETS, "prefill_time"),
    "request_decode_time_seconds": ("First token to the last, in the engine core (vLLM's DECODE "
                                    "phase).", REQUEST_SECONDS_BUCKETS, "decode_time"),
    "request_inference_time_seconds": ("Scheduled to the last token, in the engine core "
                                       "(prefill + decode; vLLM's RUNNING phase).",
                                       REQUEST_SECONDS_BUCKETS, "inference_time"),
    "request_time_per_output_token_seconds": ("Decode time over the output tokens after the "
                                              "first, one per request of 2 or more tokens.",
                                              ITL_BUCKETS, "mean_time_per_output_token"),
}


class RequestMetrics:
    """Mixed into ``EngineMetrics`` (which supplies ``_histogram``, ``_child``, ``view`` and
    ``model_name``)."""

    def _vllm_meaning(self, name: str, doc: str, buckets: tuple[float, ...]):
        """The ``vllm:`` copy of a series whose vLLM meaning differs (module docstring); None
        under ``tessellm`` names."""
        if self.view.twins is None:
            return None
        return Histogram(PREFIX + name, doc, ["model_name"], registry=self.view.twins,
                         buckets=buckets).labels(model_name=self.model_name)

    def _add_request_metrics(self, token_buckets: tuple[float, ...], corrupted_requests: bool = False) -> None:
        """What the front end measures from the outputs (``IterationStats``); ``corrupted_requests``:
        the counter of requests with NaN logits, only where they are counted (vLLM's, under
        VLLM_COMPUTE_NANS_IN_LOGITS: ``tessellm.envs.compute_nans_in_logits``)."""
        self.corrupted = self._child(Counter, "corrupted_requests_total", "Requests whose logits held "
                                     "a NaN in some step (counted when they finish).") if corrupted_requests else None
        self.corrupted_log = CorruptedLog() if corrupted_requests else None  # and vLLM's log line
        self.prompt_tokens = self._child(Counter, "prompt_tokens_total", "Prompt tokens of requests "
                                         "that produced their first token (cached ones included).")
        self.generation_tokens = self._child(Counter, "generation_tokens_total",
                                             "Output tokens generated.")
        by_source = Counter(PREFIX + "prompt_tokens_by_source_total", "Prompt tokens by where their "
                            "KV came from: local_compute, local_cache_hit (the prefix cache), "
                            "external_kv_transfer (the host KV tier, a KV connector).",
                            ["model_name", "source"], registry=self.registry)
        self.prompt_by_source = [by_source.labels(model_name=self.model_name, source=source)
                                 for source in PromptTokenStats.SOURCES]  # exported at zero
        self.prompt_cached = self._child(Counter, "prompt_tokens_cached_total", "Prompt tokens not "
                                         "computed (prefix cache, host KV tier, KV connector).")
        self.prompt_recomputed = self._child(Counter, "prompt_tokens_recomputed_total", "Cached "
                                             "prompt tokens computed anyway (a fully cached "
                                             "prompt's last block).")
        self.success = Counter(PREFIX + "request_success_total", "Requests finished, by finish "
                               "reason (stop, length, abort).", ["model_name", "finished_reason"],
                               registry=self.registry)
        for reason in FINISH_REASONS:  # exported at zero from the start
            self.success.labels(model_name=self.model_name, finished_reason=reason)
        self.ttft = self._histogram("time_to_first_token_seconds", "Arrival to the first output "
                                    "token.", TTFT_BUCKETS)
        self.itl = self._histogram("inter_token_latency_seconds", "Time between successive outputs "
                                   "of a request.", ITL_BUCKETS)
        self.e2e = self._histogram("e2e_request_latency_seconds", "Arrival to the final output; "
                                   "requests that finished with stop or length.", REQUEST_SECONDS_BUCKETS)
        self.queue_time = self._child(Histogram, "request_queue_time_seconds", "Arrival to first "
                                      "scheduled in the engine; requests that finished with stop "
                                      "or length.", buckets=REQUEST_SECONDS_BUCKETS)
        self.vllm_queue_time = self._vllm_meaning("request_queue_time_seconds", "Queued to first "
                                                  "scheduled in the engine core (vLLM's WAITING "
                                                  "phase).", self._vllm_buckets["request_queue_time_seconds"])
        self.vllm_iteration_tokens = self._vllm_meaning(
            "iteration_tokens_total", "Per batch of outputs: prompt tokens of the sequences that got "
            "their first token in it plus its output tokens.", self._vllm_buckets["iteration_tokens_total"])
        self.request_prompt_tokens = self._histogram("request_prompt_tokens", "Prompt tokens per "
                                                     "finished request.", token_buckets)
        self.request_generation_tokens = self._histogram("request_generation_tokens", "Output "
                                                         "tokens per finished request.", token_buckets)
        self.phases = {field: self._histogram(name, doc, buckets)
                       for name, (doc, buckets, field) in _PHASES.items()}
        self.prefill_kv_computed = self._histogram("request_prefill_kv_computed_tokens", "Prompt "
                                                   "tokens computed per finished request (not "
                                                   "cached).", token_buckets)
        self.params_max_tokens = self._histogram("request_params_max_tokens", "The max_tokens "
                                                 "parameter of finished requests that set it.", token_buckets)
        self.params_n = self._histogram("request_params_n", "The n parameter of finished requests "
                                        "(once per request).", N_PARAM_BUCKETS)
        self.max_num_generation_tokens = self._histogram(
            "request_max_num_generation_tokens", "The most output tokens of a finished request's "
            "samples (once per request).", token_buckets)

    def observe_outputs(self, it: IterationStats) -> None:
        if it.num_prompt_tokens:
            self.prompt_tokens.inc(it.num_prompt_tokens)
            self._observe_prompt_sources(it.prompt_tokens)
        if it.num_generation_tokens:
            self.generation_tokens.inc(it.num_generation_tokens)
        if self.vllm_iteration_tokens is not None and (it.num_prompt_tokens or it.num_generation_tokens):
            self.vllm_iteration_tokens.observe(it.num_prompt_tokens + it.num_generation_tokens)
        for t in it.time_to_first_token:
            self.ttft.observe(t)
        for t in it.inter_token_latency:
            self.itl.observe(t)
        for fin in it.finished:
            self._observe_finished(fin)
        if self.corrupted_log is not None:
            self.corrupted_log.maybe_log()
        for n, most in zip(it.n_params, it.max_num_generation_tokens):
            self.params_n.observe(n)
            self.max_num_generation_tokens.observe(most)

    def _observe_prompt_sources(self, prompt: PromptTokenStats) -> None:
        for counter, n in zip(self.prompt_by_source, prompt.by_source()):
            if n:
                counter.inc(n)
        if prompt.cached:
            self.prompt_cached.inc(prompt.cached)
        if prompt.recomputed:
            self.prompt_recomputed.inc(prompt.recomputed)

    def _observe_finished(self, fin: FinishedRequest) -> None:
        self.success.labels(model_name=self.model_name, finished_reason=fin.finish_reason).inc()
        if fin.is_corrupted and self.corrupted is not None:  # once per request, when it ends (vLLM's)
            self.corrupted.inc()
            self.corrupted_log.add()
        if fin.by_client:  # the client left: its latency says nothing of the engine (vLLM: not observed)
            return
        self.e2e.observe(fin.e2e_latency)
        if fin.queue_time is not None:
            self.queue_time.observe(fin.queue_time)
        _observe(self.vllm_queue_time, fin.queued_time)
        for field, histogram in self.phases.items():
            _observe(histogram, getattr(fin, field))
        self.request_prompt_tokens.observe(fin.num_prompt_tokens)
        self.request_generation_tokens.observe(fin.num_generation_tokens)
        self.prefill_kv_computed.observe(max(0, fin.num_prompt_tokens - fin.num_cached_tokens))
        if fin.max_tokens_param:
            self.params_max_tokens.observe(fin.max_tokens_param)


def _observe(histogram, value: Optional[float]) -> None:
    if histogram is not None and value is not None:
        histogram.observe(value)
