"""Results handed to users: shaped like vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None  # 1 = most likely
    decoded_token: Optional[str] = None


# Per position: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[SampleLogprobs] = None
    # "stop", "length", "abort" (the caller's), "error" (vLLM's: the engine failed the request,
    # e.g. a custom logits processor raised; retryable); None while running
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None  # the stop string or token id that ended it; "error": why
    lora_request: Optional[object] = None  # the request's LoRARequest (None: the base model)

    def finished(self) -> bool:
        return self.finish_reason is not None


class GrowingPrefix:
    """The first ``size`` items of a list that is only ever appended to (a running sample's
    token ids or logprobs): what an output holds in place of a copy until it is read. Building a
    cumulative output then costs O(1) per sample, not O(tokens so far); an output that nobody
    reads (a server's stream keeps only the newest) is never copied."""

    __slots__ = ("items", "size")

    def __init__(self, items: list, size: int):
        self.items, self.size = items, size

    def read(self) -> list:
        return self.items[:self.size]


def _snapshot_field(name: str) -> property:
    """A CompletionOutput field that may be given as a ``GrowingPrefix``: the list is copied out
    of it on the first read, and kept."""
    private = "_" + name

    def get(self):
        value = self.__dict__[private]
        if isinstance(value, GrowingPrefix):
            value = self.__dict__[private] = value.read()
        return value

    def put(self, value) -> None:
        self.__dict__[private] = value

    return property(get, put, doc=f"CompletionOutput.{name} (a snapshot: it never changes once returned)")


# Properties over the dataclass's fields (its __init__, repr and == go through them).
CompletionOutput.token_ids = _snapshot_field("token_ids")
CompletionOutput.logprobs = _snapshot_field("logprobs")


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: Optional[PromptLogprobs] = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # vLLM's other fields, same names: the first sample's RequestStateStats (vLLM's fields:
    # num_generation_tokens, arrival_time, queued_ts, scheduled_ts, first_token_ts,
    # last_token_ts, first_token_latency, is_corrupted; plus tessellm's wall-clock
    # first_scheduled_time, first_token_time, last_token_time: tessellm.metrics.stats), the
    # request's LoRARequest
    metrics: Optional[object] = None
    lora_request: Optional[object] = None
    # What a KV connector hands back with the finish of a do_remote_decode request (a producer:
    # where the decode engine fetches its blocks, docs/kv_transfer.md); None otherwise
    kv_transfer_params: Optional[dict] = None
    # Encoder-decoder models' fields (tessellm runs decoder-only models: always None), and the
    # image placeholders' positions (vLLM's multi_modal_placeholders; empty here)
    encoder_prompt: Optional[str] = None
    encoder_prompt_token_ids: Optional[list[int]] = None
    multi_modal_placeholders: dict = field(default_factory=dict)
    # vLLM's prefill scoring (SamplingParams.prompt_logprob_token_ids): numpy float32
    # [rows, len(ids)], row i the logprobs of the ids at prompt row prompt_logprob_start + i
    # (scoring prompt token prompt_logprob_start + i + 1); None when not asked or no row is
    # scored. In the first output of a DELTA request only, as prompt_logprobs.
    prompt_token_id_logprobs: Optional[object] = None

    def add(self, newer: "RequestOutput") -> None:
        """vLLM's: fold a later DELTA output of this request into this one (what a consumer that
        fell behind gets): texts, token ids and logprobs joined per sample, the rest the newer's."""
        mine = {c.index: c for c in self.outputs}
        for c in newer.outputs:
            old = mine.get(c.index)
            if old is None:
                self.outputs.append(c)
                continue
            old.text, old.token_ids = old.text + c.text, old.token_ids + c.token_ids
            if c.logprobs is not None:
                old.logprobs = (old.logprobs or []) + c.logprobs
            old.cumulative_logprob, old.finish_reason, old.stop_reason = (c.cumulative_logprob, c.finish_reason,
                                                                          c.stop_reason)
        self.finished, self.num_cached_tokens, self.metrics = newer.finished, newer.num_cached_tokens, newer.metrics
        self.prompt_logprobs = self.prompt_logprobs or newer.prompt_logprobs
        if self.prompt_token_id_logprobs is None:
            self.prompt_token_id_logprobs = newer.prompt_token_id_logprobs
        self.kv_transfer_params = newer.kv_transfer_params or self.kv_transfer_params
