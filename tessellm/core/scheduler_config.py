"""The scheduler's configuration and statistics, the one check that a prompt can ever run and
the one rule for how much of it ``truncate_prompt_tokens`` keeps.

Plain Python, no torch: the front end imports ``check_prompt_fits`` and ``prompt_tokens_to_keep``
without the scheduler.
All three stay importable from ``tessellm.core.scheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tessellm.spec_decode.metrics import SpecDecodeStats


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
    # Pooling engine (tessellm.pooling): requests end with their prompt, which may then fill
    # the whole context (nothing is generated after it).
    pooling: bool = False
    # Image models (tessellm.multimodal.encoder_budget): placeholder tokens the vision encoder
    # may take in one step, and image features the runner's encoder cache may hold at once
    # (vLLM's ``max_num_encoder_input_tokens`` / ``encoder_cache_size``). 0: a text-only model.
    max_num_encoder_input_tokens: int = 0
    encoder_cache_size: int = 0
    # Image models: no chunk ends inside an image's placeholders (vLLM's
    # ``disable_chunked_mm_input``; tessellm.multimodal.encoder_budget.end_outside_images).
    disable_chunked_mm_input: bool = False
    # vLLM's --scheduling-policy (core/request_queue.py): "fcfs" serves requests in arrival
    # order; "priority" by (priority, arrival time), lower first, and preempts the request
    # last in that order when blocks run out.
    policy: str = "fcfs"


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    spec_decode: Optional[SpecDecodeStats] = None  # totals since start; None: no speculation
    # The host KV tier's totals since start (HostKVTier.stats_dict); None: no tier.
    kv_offload: Optional[dict] = None
    # A KV connector's totals since start (KVConnectorStats.as_dict); None: no connector.
    kv_connector: Optional[dict] = None
    # Recurrent-state snapshots for prefix caching (StateSnapshots.stats_dict); None: no pool.
    state_snapshots: Optional[dict] = None
    # With LoRA (lora/scheduling.lora_stats): adapters of running and waiting requests, slots.
    lora: Optional[dict] = None
    # Of num_waiting, those vLLM calls "deferred" (Scheduler.deferred: a KV connector load, a
    # grammar, a LoRA slot); the others wait for "capacity" (blocks, budget, max_num_seqs).
    num_waiting_deferred: int = 0


class ContextLengthError(ValueError):
    """A prompt at or over the context length (the server answers code "context_length_exceeded")."""


class RequestParamError(ValueError):
    """A request parameter the engine refuses; ``param`` names the field (the server's error
    object carries it)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_truncate_prompt_tokens(value) -> None:
    """vLLM's ``truncate_prompt_tokens`` is None, -1 or an integer >= 1 (0 would empty the
    prompt); else RequestParamError naming it. The one check of SamplingParams, PoolingParams and
    every server endpoint (``prompt_tokens_to_keep``)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and (value == -1 or value >= 1)):
        return
    raise RequestParamError("truncate_prompt_tokens must be -1 (as many as the context holds) or an "
                            f"integer >= 1, got {value!r}.", "truncate_prompt_tokens")


def prompt_tokens_to_keep(truncate_prompt_tokens: Optional[int], max_model_len: int,
                          room: int = 1) -> Optional[int]:
    """vLLM's ``truncate_prompt_tokens`` as a count of prompt tokens to keep, one rule for
    ``LLM.generate`` / ``LLM.embed`` and every server endpoint. None: keep them all. -1: the
    context length, as vLLM resolves it (max_model_len), less the ``room`` positions the prompt
    must leave (``check_prompt_fits``: one for a generated token, none for pooling); whatever
    max_tokens asks for, as in vLLM (a prompt and max_tokens over the context are then refused).
    A count past the context length is refused, as vLLM refuses it, and so is 0."""
    check_truncate_prompt_tokens(truncate_prompt_tokens)
    if truncate_prompt_tokens is None:
        return None
    if truncate_prompt_tokens == -1:
        return max_model_len - room
    if truncate_prompt_tokens > max_model_len:
        raise RequestParamError(f"truncate_prompt_tokens is {truncate_prompt_tokens}, over the model's "
                                f"context length of {max_model_len} tokens; give at most "
                                f"{max_model_len}, or -1 for as many as fit.", "truncate_prompt_tokens")
    return truncate_prompt_tokens


def check_prompt_fits(num_tokens: int, max_model_len: int, kv_capacity_tokens: int,
                      room: int = 1) -> None:
    """One clear ValueError for a prompt that can never run; shared by the front end and core.
    ``room``: positions the prompt must leave free (1: a token is generated after it; 0: a
    pooling request, which ends with its prompt)."""
    if num_tokens == 0:
        raise ValueError("The prompt is empty; give at least one token.")
    if num_tokens + room > max_model_len:
        raise ContextLengthError(f"The prompt has {num_tokens} tokens but this model's maximum context "
                                 f"length is {max_model_len} tokens; shorten the prompt to at most "
                                 f"{max_model_len - room} tokens.")
    if num_tokens + room > kv_capacity_tokens:
        raise ValueError(f"The prompt has {num_tokens} tokens but the KV cache holds only "
                         f"{kv_capacity_tokens} tokens; give the cache more blocks (num_kv_blocks) "
                         "or shorten the prompt.")
