"""The step boundary: what the scheduler hands the model runner, and what comes back.

One module owns these dataclasses; ``tessellm.distributed.codec`` sends them to workers field
by field, by name, under ``STEP_SCHEMA_VERSION`` (bump it when a field changes meaning; adding
a field with a default needs no bump: an older reader refuses names it does not know, loudly).

Per scheduled request a step says how many tokens to **compute** and how many to **sample**::

    request  known tokens   drafts    computed this step     sampled rows
    A        t0..t9 (9 in   d0 d1 d2  t9 d0 d1 d2   (4)      4: after t9, d0, d1, d2
             the cache)                                       (k+1 rows verify k drafts)
    B        u0..u5 (5)     -         u5            (1)      1
    C        prompt chunk   -         v0..v7        (8)      0 (the prompt goes on next step)

A request samples 0 rows (a prefill chunk before its prompt's end), 1 row (the step reaches
its last known token) or k+1 rows (it verifies k draft tokens). Sampled rows are laid out
request after request in the order the runner batches them; ``grammar_bitmask`` rows follow
the same per-request layout (``grammar_bitmask_rows`` gives each request's first row).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

STEP_SCHEMA_VERSION = 1


class StepSchemaError(ValueError):
    """A message this process cannot read (another tessellm version sent it)."""


@dataclass
class NewRequestData:
    """A request the model runner has not seen before (or is resuming after preemption)."""

    request_id: str
    prompt_token_ids: list[int]
    all_token_ids: list[int]  # prompt + output so far (output is non-empty after preemption)
    sampling_params: Any  # SamplingParams
    block_ids: list[int]  # every block the request holds, in order
    num_computed_tokens: int  # tokens whose K/V is already in the cache (prefix-cache hit)
    # Images of the prompt (tessellm.multimodal.inputs.MultiModalFeature): pixels, placeholder
    # span, hash. Sent again on resume: the runner recomputes their features. Empty: text.
    mm_features: list = field(default_factory=list)
    # A pooling request's task ("embed", "classify", "token_embed", "token_classify"); None:
    # a generating request. The runner's pooler keeps every prompt row for a "token_*" one.
    pooling_task: Optional[str] = None
    # A prompt given as embeddings (tessellm.core.prompt_embeds.PromptEmbeds): the runner
    # embeds its prompt positions with these rows. Sent again on resume. None: token ids.
    prompt_embeds: Any = None


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed."""

    request_id: str
    new_block_ids: list[int]  # appended to the runner's block table for the request
    num_computed_tokens: int  # before this step (the runner overwrites its own count with it)
    # Pipeline parallelism only: the tokens this step computes, for stages that do not sample
    # (the last stage samples; the first needs the sampled ids as its next inputs).
    new_token_ids: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    """The scheduler's decision for one step, handed to the model runner (every rank)."""

    new_requests: list[NewRequestData]  # first time scheduled, or resumed after preemption
    cached_requests: list[CachedRequestData]  # scheduled again; the runner has their state
    num_scheduled_tokens: dict[str, int]  # request id -> tokens to compute this step (drafts in)
    total_num_scheduled_tokens: int  # sum of num_scheduled_tokens
    # Request id -> rows sampled this step: 1 when the step reaches the request's last known
    # token, k+1 when it also verifies k drafts; absent means 0 (a prompt chunk before the end).
    num_sampled_tokens: dict[str, int] = field(default_factory=dict)
    # Request id -> draft tokens computed after its last known token (counted in
    # num_scheduled_tokens) and verified by its k+1 sampled rows. Absent: no drafts.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Async scheduling with speculation: request id -> drafts reserved for a request scheduled
    # while its step in flight samples (whose accepted count the scheduler does not know yet).
    # Its ``num_scheduled_tokens`` / ``num_sampled_tokens`` (1 + k) are upper bounds: the runner
    # starts it after its last accepted token and verifies at most k of its proposer's drafts
    # (``ModelRunnerOutput.spec_ahead_drafts`` says how many). tessellm/core/spec_ahead.py.
    spec_ahead: dict[str, int] = field(default_factory=dict)
    # Request id -> blocks it keeps: the scheduler gave back the blocks past them (rejected or
    # unused draft slots) since the last step; the runner cuts its block list before appending
    # ``new_block_ids``. Requests it no longer holds are ignored.
    kept_blocks: dict[str, int] = field(default_factory=dict)
    # Structured output: request id -> its first row in ``grammar_bitmask`` (one row per sampled
    # row, in order). Absent: the request's logits are not masked.
    grammar_bitmask_rows: dict[str, int] = field(default_factory=dict)
    # int32 numpy array [rows, ceil(vocab / 32)], bit j of word w set = token 32*w + j allowed;
    # None when no request in the step is constrained.
    grammar_bitmask: Optional[Any] = None
    # Async scheduling: the mask needs the tokens of the step in flight before this one, so it
    # comes later (``ModelRunner.sample_deferred``); the runner runs the forward pass and waits
    # for it before sampling (tessellm.structured_output.manager).
    grammar_deferred: bool = False
    # Multi-LoRA: request id -> adapter slot on the device. Absent: the base model.
    lora_slots: dict[str, int] = field(default_factory=dict)
    # Multi-LoRA: adapters to put into slots before this step's forward, ``[slot, {"name",
    # "id", "path"}]`` each (the runner reads them from its host cache, tessellm.lora.store).
    lora_loads: list = field(default_factory=list)
    # Multi-LoRA: adapters first named since the last step (``{"name", "id", "path"}`` each): a
    # worker process starts reading them into its own host cache now, off its step.
    lora_prefetch: list = field(default_factory=list)
    # Multi-LoRA: adapter ids unloaded since the last step (``EngineCore.remove_lora``, once no
    # request uses them): a worker process drops its host copy before this step's prefetch and
    # loads, so a later request reads the adapter's files again.
    lora_unloads: list = field(default_factory=list)
    # Image models: request id -> its images (indices into ``mm_features``) whose features the
    # runner gets this step, from the vision encoder or an equal image it holds; within the
    # scheduler's encoder budget (tessellm.multimodal.encoder_budget). The runner finds the same
    # images from the positions it computes; this records the scheduler's decision.
    encoder_inputs: dict[str, list[int]] = field(default_factory=dict)
    # The host KV tier (--kv-offloading-size, tessellm/core/kv_offload.py): copies every rank
    # makes on its own cache before this step's forward, in this order: ``[0, device_block,
    # host_slot]`` stores an evicted prefix block in the host buffer, ``[1, host_slot,
    # device_block]`` loads one back into a block this step's requests read. Empty: none.
    kv_transfers: list = field(default_factory=list)
    # A KV connector (--kv-transfer-config, tessellm/kv_transfer): what its worker half loads
    # before this step's forward and saves after it, as its scheduler half built it (plain
    # data; SharedStorageConnector: {"loads": [[request id, [[key, block], ...]], ...],
    # "saves": [[key, block], ...]}). None: nothing this step.
    kv_connector_meta: Optional[dict] = None
    # Recurrent-state models with prefix caching (tessellm/core/state_prefix.py): request id ->
    # the snapshot slot its state starts from (a new request whose prefix hit ends at that
    # snapshot's block), copied into its state slot before this step's forward.
    state_restores: dict[str, int] = field(default_factory=dict)
    # Request id -> the snapshot slot that receives its state after this step's forward (its
    # chunk ends on a block boundary a later prefix hit may end at).
    state_saves: dict[str, int] = field(default_factory=dict)
    # Request id -> ``[[n, slot], ...]``: the state after the request's first ``n`` tokens, a
    # block boundary strictly inside this step's prefill chunk, copied into snapshot ``slot``
    # where the step's ops compute it (``MambaBatch.state_saves``; core/state_prefix.py).
    state_saves_within: dict[str, list] = field(default_factory=dict)
    # Speculative decoding: request id -> ``[[n, slot], ...]``: the state after the request's
    # first ``n`` tokens, which this step computes (a verify step keeps the state after each
    # of its tokens), copied into snapshot ``slot`` after the forward. Drafts before token
    # ``n - 1`` may be rejected: the scheduler keeps the snapshot only once it knows token
    # ``n - 1`` was accepted (``BlockManager.settle_state_saves``; core/state_prefix.py).
    state_saves_if_accepted: dict[str, list] = field(default_factory=dict)
    # Since the last step: requests that ended (finished or aborted); the runner drops them.
    finished_request_ids: set[str] = field(default_factory=set)
    # Preempted while building this step: the runner drops their state; they come back later as
    # new requests (recomputed from their tokens).
    preempted_request_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0

    @property
    def num_preempted(self) -> int:
        """Preemptions made while building this step."""
        return len(self.preempted_request_ids)

    @property
    def dropped_request_ids(self) -> set[str]:
        """Every request whose runner state goes away: finished or preempted."""
        return self.finished_request_ids | self.preempted_request_ids


@dataclass
class ModelRunnerOutput:
    """What one step produced, from the (last-stage) runner back to the scheduler."""

    # Request id -> accepted token ids: one for a plain sampled row; for k drafts, the drafts
    # that matched the target's samples followed by the target's next token (1..k+1 ids).
    # Absent: the request sampled nothing (partial prefill, an earlier pipeline stage).
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list] = field(default_factory=dict)  # per accepted token (id, lp, rank, top)
    prompt_logprobs: dict[str, list] = field(default_factory=dict)  # per prompt position, first None
    # prompt_logprob_token_ids' scores: request id -> one list of logprobs per scored prompt
    # row (SamplingParams.prompt_logprob_start on), in the step that computed the last of them
    prompt_token_id_logprobs: dict[str, list] = field(default_factory=dict)
    # Speculative decoding: request id -> draft tokens the proposer made for the next step
    # (the scheduler puts them in Request.spec_token_ids). Absent: none.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Requests in ``SchedulerOutput.spec_ahead``: request id -> drafts the step verified.
    spec_ahead_drafts: dict[str, int] = field(default_factory=dict)
    # Pooling runner (tessellm.pooling): request id -> its pooled hidden state (float32 values,
    # before the request's dimensions / normalize), in the step that computed its last prompt
    # token; the request is finished then. Absent: not pooled in this step. A per-token task
    # ("token_*") sends one row per prompt token as {"shape": [tokens, width], "data":
    # little-endian float32 bytes} (tessellm.pooling.pooler.pack_rows).
    pooled: dict[str, Any] = field(default_factory=dict)
    # A KV connector's loads that failed on some rank (missing, corrupt, another layout): these
    # requests' results of the step are dropped and they are recomputed without the connector.
    kv_load_failed: list[str] = field(default_factory=list)
    # A KV connector's background loads (``meta["check"]``) finished on every rank: request id
    # -> True (its blocks are in the cache) or False (failed: recomputed).
    kv_loads_finished: dict[str, bool] = field(default_factory=dict)
    # A KV connector's saves settled on the output rank since start: [saved, failed, dropped]
    # blocks (KVConnectorBase.save_totals); None: none.
    kv_saves: Optional[list] = None
    # Requests whose step failed in a custom logits processor (it raised in update_state or
    # apply: every request of that step): request id -> the error. They finish with reason
    # "error", the error as their stop_reason; the engine goes on (docs/logits_processors.md).
    failed: dict[str, str] = field(default_factory=dict)
    # TESSELLM_COMPUTE_NANS_IN_LOGITS: request id -> NaN logits in its rows of the step (vLLM's
    # num_nans_in_logits); absent: none, or not counted.
    num_nans_in_logits: dict[str, int] = field(default_factory=dict)


# -- field-by-name encoding helpers (the codecs: tessellm.distributed.codec, engine_process) --

def dataclass_fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def build_dataclass(cls, d: dict, what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise StepSchemaError(f"{what} has field(s) {unknown} that this tessellm does not know; "
                              "run the same tessellm version in the engine and every worker.")
    return cls(**d)


def check_version(d: dict, what: str) -> None:
    version = d.pop("v", None)
    if version != STEP_SCHEMA_VERSION:
        raise StepSchemaError(f"{what} uses step schema version {version!r}, but this tessellm "
                              f"speaks version {STEP_SCHEMA_VERSION}; run the same tessellm "
                              "version in the engine and every worker.")
