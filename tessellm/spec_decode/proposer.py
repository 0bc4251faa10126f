"""The proposer interface: what drafts tokens for the next step, called by the model runner.

When it runs (``ModelRunner``, every rank, after the step's sampled ids reach the host)::

    step N:  forward (target) -> sample / verify -> accepted tokens per request
             -> proposer.propose(ProposeInput)      drafts for step N+1, at most ``max_drafts``
             -> ModelRunnerOutput.spec_token_ids    -> scheduler: Request.spec_token_ids
    step N+1: the scheduler schedules [last token, d0 .. dk-1] (cut to budget / max_tokens),
             allocating ``num_lookahead_tokens`` extra KV slots; the target verifies them.

The proposer is also called for steps in which nothing sampled (prefill chunks): a draft model
or EAGLE head fills its own KV cache for those tokens (``ProposeInput.sampled`` is empty).

A proposer with its own KV cache (a draft model, an EAGLE head) returns its attention layers
from ``attention_layers()``: the runner allocates their caches with the target's (the same
number of blocks, sized together) and they use the **target's block ids**: the same
``slot_mapping`` and ``block_tables`` address both. The scheduler keeps
``num_lookahead_tokens`` slots allocated past a request's computed tokens, so a draft model
may write K/V for its own drafts' positions (up to ``num_tokens + k - 1``) into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from tessellm.spec_decode.config import SpeculativeConfig


@dataclass
class ProposerContext:
    """What a proposer may use, given once at construction (in each worker)."""

    config: SpeculativeConfig
    target: Any  # the target model (nn.Module: embed_tokens, lm_head, compute_logits, ...)
    kernel: Any  # the attention kernel of the target (build_metadata(AttentionBatch))
    backend: Any  # the selected Backend
    device: torch.device
    dtype: torch.dtype  # activations
    block_size: int
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    tp: Any = None  # TensorParallel of this rank (draft layers may shard with it)
    registry: Any = None  # the backend registry (quant methods, graph runners)
    engine_args: Any = None  # the EngineArgs (seed, load format, ...)


@dataclass
class StepTensors:
    """The step's forward inputs and outputs on the device, as the target used them.

    ``T`` token rows (every scheduled token, requests in ``ProposeInput.order``), ``R`` sampled
    rows. ``hidden_states`` is the target's final (normed) hidden state per token row;
    ``aux_hidden_states`` the inputs of the layers in ``Proposer.aux_hidden_layers`` (residual
    stream, before the layer), both only when the proposer asks for them.
    """

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T]
    attention: Any  # the step's AttentionBatch (query_start_loc, seq_lens, block_tables, ...)
    logits_indices: torch.Tensor  # int64 [R]: token rows that were sampled
    sampled_token_ids: Optional[torch.Tensor]  # int64 [R]: the target's sample per row
    hidden_states: Optional[torch.Tensor] = None  # [T, hidden]
    aux_hidden_states: Optional[list[torch.Tensor]] = None  # per aux layer [T, hidden]


@dataclass
class ProposeInput:
    """One step, after its tokens were accepted. Lists are per scheduled request in ``order``."""

    order: list[str]  # request ids in the step's token-row order
    states: list[Any]  # RunnerRequest per request: token_ids (accepted only), row, params, ...
    num_scheduled: list[int]  # token rows per request this step
    # request id -> accepted tokens this step (1..k+1); absent: it sampled nothing (prefill chunk)
    sampled: dict[str, list[int]]
    # request id -> drafts it verified this step (absent: none)
    verified_drafts: dict[str, list[int]]
    max_drafts: int  # the load policy's drafts per request for the next step (0: propose none)
    tensors: Optional[StepTensors] = None  # None unless the proposer ``needs_step_tensors``


@dataclass
class Proposal:
    """Drafts for the next step. ``draft_probs``: request id -> float32 [k, vocab], the
    distribution each draft was sampled from; absent: the draft is a point mass (n-gram,
    replay, greedy drafting), which the verifier then treats as one-hot q."""

    token_ids: dict[str, list[int]] = field(default_factory=dict)
    draft_probs: dict[str, torch.Tensor] = field(default_factory=dict)


class Proposer:
    """Base class: subclasses set the class attributes they need and implement ``propose``."""

    needs_step_tensors: bool = False  # fill ProposeInput.tensors (device tensors of the step)
    needs_hidden_states: bool = False  # ... with StepTensors.hidden_states
    aux_hidden_layers: tuple[int, ...] = ()  # ... with these layers' inputs (EAGLE-3)
    # KV slots past a request's computed tokens the scheduler keeps allocated (draft models: k)
    num_lookahead_tokens: int = 0
    # Proposals may carry ``draft_probs``: the rejection sampler verifies them (the memory
    # profile runs it over its sampled rows). False: point-mass drafts (every built-in method).
    draft_distributions: bool = False

    def __init__(self, ctx: ProposerContext):
        self.ctx = ctx
        self.config = ctx.config

    def attention_layers(self) -> list:
        """Layers holding KV cache (allocated with the target's, same block ids). None here."""
        return []

    def load_weights(self) -> None:
        """Called once after the target loaded (before KV sizing)."""

    def capture_graphs(self) -> None:
        """Called after the KV cache exists, when the target captures its graphs."""

    def profile(self, inp: ProposeInput) -> None:
        """The memory profile's proposal (``core/memory_profile.py``), after the profile step:
        ``inp`` has every row sampled and ``max_drafts`` drafts wanted; whatever ``propose``
        allocates on the device should be allocated here at its largest (no graphs: they are
        captured after the cache, ``graph_memory_estimate``), and nothing kept. Nothing here
        (a proposer that drafts on the host)."""

    def graph_memory_estimate(self, logits_row_bytes: int, step_bytes_per_token: float) -> int:
        """Bytes ``capture_graphs`` will allocate, reserved before the KV cache is sized:
        ``step_bytes_per_token``, the peak of ``profile`` over its tokens. 0 here."""
        return 0

    def propose(self, inp: ProposeInput) -> Proposal:
        raise NotImplementedError

    def remove_requests(self, request_ids) -> None:
        """Requests that finished or were preempted: drop any per-request state."""


_METHODS = {
    "ngram": "tessellm.spec_decode.ngram:NgramProposer",
    "replay": "tessellm.spec_decode.replay:ReplayProposer",
    "draft_model": "tessellm.spec_decode.draft_model:DraftModelProposer",
    "eagle": "tessellm.spec_decode.eagle:EagleProposer",
    "eagle3": "tessellm.spec_decode.eagle:Eagle3Proposer",
    "mtp": "tessellm.spec_decode.mtp:MTPProposer",
}


def proposer_class(method: str) -> type:
    """The proposer class of a (validated) speculative ``method``; nothing built."""
    import importlib

    module_name, cls_name = _METHODS[method].split(":")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        raise ValueError(f"speculative_config method {method!r} is not available in this "
                         "tessellm build; use ngram or replay.") from None


def wants_step_tensors(proposer) -> bool:
    """Whether a proposer (or its class: the flags are class attributes, EAGLE-3's layers
    come with its ``needs_step_tensors``) reads the step's device tensors: its verify steps
    then run eagerly (``RunnerGraphs._verify_captured``)."""
    return bool(proposer.needs_step_tensors or proposer.needs_hidden_states
                or proposer.aux_hidden_layers)


def make_proposer(ctx: ProposerContext) -> Proposer:
    """The proposer for ``ctx.config.method``, its weights loaded."""
    proposer = proposer_class(ctx.config.method)(ctx)
    proposer.load_weights()
    return proposer
