"""What the engine core hands its front end per request and step: token ids, never text.

An ``EngineCoreOutput`` leaves the core whole: the scheduler builds it from the step's
``ModelRunnerOutput`` with the sampled tokens and their logprobs together, and nothing is
attached to it afterwards. ``tessellm.core.engine_process`` sends it to the API process by
field name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class EngineCoreOutput:
    """What one request produced in a step (token ids only; text is the front end's job)."""

    request_id: str
    new_token_ids: list[int]  # accepted this step, in order (several with draft tokens)
    finish_reason: Optional[str] = None  # "stop", "length", "abort", "error" when finished
    stop_reason: Optional[object] = None  # the stop token id that ended it (or why: abort, error)
    logprobs: Optional[list] = None  # per new token: (token_id, logprob, rank, [(id, lp), ...])
    prompt_logprobs: Optional[list] = None  # per prompt position (first is None)
    # prompt_logprob_token_ids' scores, one list per scored prompt row (no leading None)
    prompt_token_id_logprobs: Optional[list] = None
    # Prompt tokens found in the prefix cache at first schedule (the OpenAI usage's
    # ``cached_tokens``); the only meaning "cached" has in a request's counters.
    num_cached_tokens: int = 0
    # On its first output only: of those, the tokens the host KV tier or a KV connector supplied
    # (vLLM's name), and the cached tokens computed anyway (a fully cached prompt's last block:
    # BlockManager.num_recomputed); the front end's prompt_tokens_by_source.
    num_external_computed_tokens: int = 0
    num_recomputed_tokens: int = 0
    # time.time() when the request was first scheduled; on its first output only (queue time).
    first_scheduled_time: Optional[float] = None
    # time.monotonic() when the scheduler queued it and first scheduled it; on its first output
    # only (vLLM's RequestStateStats.queued_ts / scheduled_ts, in RequestOutput.metrics).
    queued_ts: Optional[float] = None
    scheduled_ts: Optional[float] = None
    # Pooling engine: the prompt's pooled hidden state (raw float32 values), with its finish;
    # a per-token task's rows as ModelRunnerOutput.pooled describes them.
    pooled: Optional[object] = None
    # With its finish: what its KV connector handed back (a producer's kv_transfer_params for
    # the decode engine: RequestOutput.kv_transfer_params); None otherwise.
    kv_transfer_params: Optional[dict] = None
    # NaN logits in this step's rows of the request (TESSELLM_COMPUTE_NANS_IN_LOGITS; vLLM's
    # name): the front end marks the request corrupted (metrics' corrupted_requests).
    num_nans_in_logits: int = 0
