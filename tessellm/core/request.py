"""A request as the scheduler sees it: token ids and counters, no tensors."""

from __future__ import annotations

import enum
import time
from typing import Iterable, Optional

from tessellm.core.repetition import RepetitionDetector
from tessellm.core.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything from here on is finished.
    FINISHED_STOPPED = 3  # EOS, a stop token or a stop string
    FINISHED_LENGTH = 4  # max_tokens or the context length
    FINISHED_ABORTED = 5  # aborted by the caller (client disconnect, stop string in front end)
    # vLLM's FINISHED_ERROR: the engine failed this request on its own (a custom logits
    # processor raised in its step); retryable, a 500 at the server (docs/openai_api.md).
    FINISHED_ERROR = 6
    # vLLM's FINISHED_REPETITION: the output ends in a repeated pattern (repetition_detection).
    FINISHED_REPETITION = 7

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> Optional[str]:
        return _FINISH_REASON.get(self)


_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
    RequestStatus.FINISHED_REPETITION: "repetition",  # vLLM's FinishReason.REPETITION
}


class Request:
    """One sequence being generated.

    ``all_token_ids`` is the prompt followed by the output so far. ``num_computed_tokens`` of
    them have K/V in the cache; the scheduler advances it, and a preemption resets it to 0 (the
    request is then recomputed from its tokens, so it resumes with identical results). What steps
    in flight owe it is the scheduler's ``InFlightSteps``, not a counter here.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: Iterable[int] = (), arrival_time: Optional[float] = None,
                 cache_salt: Optional[str] = None, wait_for: Optional[str] = None,
                 lora_request=None, mm_features=None, pooling_task: Optional[str] = None,
                 prompt_embeds=None, priority: int = 0):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset(eos_token_ids)  # any of these ends it (unless ignore_eos)
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.cache_salt = cache_salt  # extra key for the prefix hash (isolates tenants)
        # vLLM's: under scheduling_policy "priority", lower values are scheduled first (and
        # preempted last); ignored under "fcfs", where the front end allows only 0.
        self.priority = priority
        # Multi-LoRA: the adapter (tessellm.lora.LoRARequest) or None for the base model, and
        # the device slot it holds while running (-1: none; tessellm.lora.slots).
        self.lora_request = lora_request
        self.lora_slot = -1
        # n > 1: the sibling that computes the shared prompt first; this request waits for it so
        # that it can take the prompt's blocks from the prefix cache.
        self.wait_for = wait_for
        self.all_token_ids = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Prompt tokens found in the prefix cache at first schedule; -1 until scheduled. ("Cached"
        # always means "in the prefix cache": see BlockManager.)
        self.num_cached_tokens = -1
        # Of those, the tokens the host KV tier or a KV connector supplied (vLLM's
        # num_external_computed_tokens); and the cached tokens computed anyway because a
        # prompt's last token always is (BlockManager.num_recomputed). Set with num_cached_tokens.
        self.num_external_tokens = 0
        self.num_recomputed_tokens = 0
        self.first_scheduled_time: Optional[float] = None  # time.time() when first scheduled
        self.queued_ts: Optional[float] = None  # time.monotonic() when the scheduler queued it
        self.scheduled_ts: Optional[float] = None  # time.monotonic() when first scheduled
        self.status = RequestStatus.WAITING
        self.stop_reason: Optional[object] = None  # the stop token id or string that ended it
        self.num_preemptions = 0
        self.block_hashes: list[int] = []  # prefix hashes of this request's full blocks
        # Leading blocks this request has published into the prefix cache (BlockManager).
        self.num_published_blocks = 0
        # A KV connector's load for it failed once (kv_transfer/base.py): it is recomputed,
        # never offered to the connector again.
        self.kv_load_failed = False
        # A KV connector loads its blocks in the background: it holds them and waits (vLLM's
        # WAITING_FOR_REMOTE_KVS), its loaded tokens counted as computed once the load is done.
        self.kv_loading = False
        # What its KV connector handed back when it finished (``request_finished``: a
        # producer's kv_transfer_params for the decode engine), for its final output; or None.
        self.kv_transfer_params_out: Optional[dict] = None
        # Draft tokens proposed for the next step (speculative decoding); the scheduler moves
        # them into the step it schedules (SchedulerOutput.spec_token_ids). Never in
        # all_token_ids until the model accepts them.
        self.spec_token_ids: list[int] = []
        # Structured output: the request's grammar matcher (structured_output.RequestGrammar,
        # opaque here), None when unconstrained. Advanced by Scheduler.update per sampled token.
        self.grammar = None
        # repetition_detection's counters (core/repetition.py), fed every appended output token
        # by Scheduler.update; None when the request does not ask for it.
        rep = getattr(sampling_params, "repetition_detection", None)
        self.repetition = RepetitionDetector(rep) if rep is not None and rep.enabled else None
        # Images (tessellm.multimodal.inputs.MultiModalFeature, plain data), in prompt order:
        # their placeholders' positions and content hashes; empty for a text prompt.
        self.mm_features = list(mm_features or ())
        # A pooling request's task (tessellm.pooling); "token_embed" / "token_classify" read
        # every prompt token's hidden state, so such a request never starts from a cache hit.
        self.pooling_task = pooling_task
        # A prompt given as embeddings (tessellm.core.prompt_embeds.PromptEmbeds, plain data):
        # its token ids are placeholders, its content hash keys the prefix cache. None: tokens.
        self.prompt_embeds = prompt_embeds

    @property
    def computes_every_prompt_token(self) -> bool:
        """Prompt logprobs, prefill scoring and per-token pooling read every prompt position:
        no prefix hit (vLLM's skip_reading_prefix_cache for them)."""
        return (self.sampling_params.needs_prompt_rows
                or (self.pooling_task or "").startswith("token_"))

    @property
    def cache_key(self) -> object:
        """The extra key of its prefix hashes: KV computed under another adapter or another
        cache salt, or from other prompt embeddings, is never shared."""
        return self._extra_key(None)

    def _extra_key(self, lora: object) -> object:
        key = self.cache_salt
        if self.lora_request is not None:
            key = (key, "lora", self.lora_request.lora_int_id if lora is None else lora)
        if self.prompt_embeds is not None:
            key = (key, "embeds", self.prompt_embeds.identifier)
        return key

    def block_key(self, start: int, end: int, lora: object = None) -> object:
        """The extra key of the prefix hash of the block over tokens ``[start, end)``:
        ``cache_key``, plus the content hashes of the images whose placeholders it covers.
        ``lora``: the adapter's part instead of its ``lora_int_id`` (which means something in
        one engine only; the KV connector's keys give a digest of the adapter's files)."""
        key = self._extra_key(lora)
        if not self.mm_features:
            return key
        from tessellm.multimodal.inputs import block_extra_keys

        images = block_extra_keys(self.mm_features, start, end)
        return (key, images) if images else key

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, {self.status.name})")
