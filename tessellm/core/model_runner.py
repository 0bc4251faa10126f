"""Model runner: turns a SchedulerOutput into flat tensors, runs the model, samples.

One concept a file, the runner only orchestrates them::

    input_batch.py        persistent per-request state and block tables (deltas from the step)
    input_builder.py      the step's flat host inputs (one builder; graphs pad what it builds)
    sampling_metadata.py  per sampled row: temperature, top-k/p, penalties, seeds, bans
    step_pipeline.py      pinned staging, launch, readback, async feed, resolve (host syncs)
    runner_output.py      draft acceptance, logprobs, prompt logprobs
    pp_io.py              pipeline-parallel receive / send
    runner_graphs.py      captured decode / verify graphs, precompiled buckets (a mixin)
    runner_kv_cache.py    the KV cache tensors per attention layer, their bytes (a mixin)
    runner_forward.py     the step's forward: eager, captured, bucketed, pooled (a mixin)
    runner_profile.py     the memory profile's step the KV cache is sized after (a mixin)

A step: apply the scheduler's deltas -> build host inputs -> copy (pinned) -> forward (eager,
or a captured graph for a pure-decode step) -> logits of the sampled rows -> grammar mask ->
sampler (a ``grammar_deferred`` step waits here for ``sample_deferred``) -> start the readback
-> advance the states (the one place they move) -> return a ``StepHandle``.

Under tensor parallelism every rank runs this same code on its shard of the model; the logits
are gathered whole on every rank and every rank samples, identically (same seed, same ops), so
each keeps its own copy of the tokens.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from tessellm.core.decode_overlap import DecodeOverlap
from tessellm.backends.reference.logits import ReferenceLogitsOps
from tessellm.core.input_batch import InputBatch, RunnerRequest  # noqa: F401 (re-exported)
from tessellm.core.input_builder import build_inputs
from tessellm.core.memory_profile import prompt_logprob_chunk
from tessellm.core.pp_io import StageIO
from tessellm.core.runner_forward import RunnerForward
from tessellm.core.runner_graphs import RunnerGraphs
from tessellm.core.runner_kv_cache import RunnerKVCache
from tessellm.core.runner_profile import RunnerProfile
from tessellm.core.runner_output import collect
from tessellm.core.sampler import Sampler
from tessellm.core.sampling_metadata import build_sampling_batch
from tessellm.core.shape_buckets import Buckets, runner_grad_mode
from tessellm.core.step import ModelRunnerOutput, SchedulerOutput
from tessellm.core.step_pipeline import DeferredSample, LaunchedSteps, Staging, StepHandle
from tessellm.distributed.parallel_state import PipelineStage
from tessellm.sample.logits_processor.state import LogitsProcessorError
from tessellm.structured_output.apply import MaskUpload, apply_grammar_bitmask

__all__ = ["ModelRunner", "ModelRunnerOutput", "RunnerRequest", "StepHandle"]


class ModelRunner(RunnerGraphs, RunnerKVCache, RunnerForward, RunnerProfile):
    """Steps in, sampled tokens out (see above); graph capture is in runner_graphs.py, the
    KV cache's allocation in runner_kv_cache.py, the step's forward in runner_forward.py, the
    memory profile's step in runner_profile.py."""

    def __init__(self, model, kernel, backend, device: torch.device, block_size: int,
                 vocab_size: int, eos_token_ids: tuple[int, ...] = (), seed: int = 0,
                 max_model_len: int = 2048, graph_runner=None, pp: Optional[PipelineStage] = None,
                 dtype: torch.dtype = torch.float32, logits_ops=None, spec=None,
                 verify_graph_factory=None, lora=None, pooler=None, decode_overlap=None,
                 max_num_seqs: int = 256, compute_nans: bool = False):
        self.model = model
        self.pp = pp or PipelineStage()
        self.dtype = dtype  # of activations (hidden states sent between stages)
        self.kernel = kernel  # the attention kernel all layers share
        # Eager steps' block tables are this many columns wide at a time (the kernel's wish:
        # Triton's kernels then see one block-table stride class in every step)
        self.table_width_multiple = int(getattr(kernel, "table_width_multiple", 1))
        self.backend = backend
        self.device = device
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)  # banned before a request's min_tokens
        # A compiling device (XLA) samples on the host: the device runs only the bucketed
        # forward programs (shape_buckets.py), one per bucket, none per sampling shape.
        self.host_sampling = device.type == "xla"
        self.buckets = Buckets.of(kernel)  # pad every step to the kernel's shape buckets
        sample_device = torch.device("cpu") if self.host_sampling else device
        # apply_token_bitmask for structured output (the backend's, else the reference's), and the
        # sampler's argmax where the backend has its own (optional in LogitsOps).
        self.logits_ops = (None if self.host_sampling else logits_ops) or ReferenceLogitsOps()
        # compute_nans: NaN logits counted per request (TESSELLM_COMPUTE_NANS_IN_LOGITS)
        self.sampler = Sampler(sample_device, seed, getattr(self.logits_ops, "argmax", None), compute_nans)
        self.mask_upload = MaskUpload(sample_device)
        self._deferred: Optional[DeferredSample] = None  # a step waiting for its grammar mask
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs  # rows a step holds at most (the profile step's)
        # rows of logits a step's prompt logprobs take at a time (the profile step runs one chunk)
        self.prompt_logprob_chunk = prompt_logprob_chunk(max_num_seqs)
        # Set by ``profile_run``: its peak over what was allocated before it (0: not measured
        # here), and one logits row's bytes (0: no logits on this stage).
        self.profile_peak_bytes = 0
        self.profile_tokens = 0
        self.logits_row_bytes = 0
        self.batch = InputBatch(-(-max_model_len // block_size))
        self.staging = Staging(device)
        # Speculative decoding (tessellm.spec_decode.runner_part.SpecDecodeRunner), or None.
        self.spec = spec
        self.steps = LaunchedSteps(sample_device, self._collect)
        self.io = StageIO(self.pp, model, dtype, device)
        self.graph_runner = graph_runner  # replays captured pure-decode steps; None: eager
        self._step_tensors = None  # the last eager forward's tensors, for a proposer that wants them
        # Speculative decoding: capture sizes -> a fresh graph runner, for the verify graphs.
        self.verify_graph_factory = verify_graph_factory
        self.verify_graphs = None  # tessellm.spec_decode.verify_graphs.VerifyGraphs once captured
        self._graphs_ready = False
        self._share_logits = False  # captured steps write one logits buffer (runner_graphs.py)
        self.graph_logits: Optional[torch.Tensor] = None
        # Multi-LoRA: the slots on the model's layers (tessellm.lora.worker), or None.
        self.lora = lora
        self._lora_slots: Optional[np.ndarray] = None  # int32 slot per token row; None: no adapter
        self._lora_graphs = False  # captured graphs take the token slots (LoRA steps replay)
        self.precompiled: Optional[dict] = None  # bucketed steps compiled at warm-up (XLA)
        # Image features between the step that reaches an image and the one that ends its
        # placeholders (tessellm.multimodal.encoder_cache); None for a text-only model.
        self.encoder_cache = None
        if getattr(model, "supports_images", False) and self.pp.is_first:  # the tower's stage
            from tessellm.multimodal.encoder_cache import EncoderCache

            self.encoder_cache = EncoderCache(model, device)
        # M-RoPE (Qwen2-VL): each request's 3-D prompt positions and rope delta; None otherwise.
        self.mrope = None
        if getattr(model, "uses_mrope", False):
            from tessellm.multimodal.mrope import MRopePositions

            self.mrope = MRopePositions(model.spatial_merge_size)
        # Gemma 3: an image's tokens attend to the whole image (AttentionBatch.key_limits over
        # the image spans a step computes, tessellm.multimodal.image_spans).
        self.image_key_limits = bool(getattr(model, "bidirectional_images", False))
        # Encoder-only models (BERT): key limits over each whole sequence (pooling/encoder.py).
        self.bidirectional = bool(getattr(model, "bidirectional", False))
        # Pooling runner (tessellm.pooling.pooler.Pooler): steps pool hidden states instead of
        # sampling (``_pool``); None: the runner generates.
        self.pooler = pooler
        # Per-request recurrent states of Mamba layers (core/mamba_state.py), set by the worker
        # for a model that has them; None otherwise.
        self.mamba = None
        # Decode micro-batch overlap (core/decode_overlap.py; ``decode_overlap``: its resolved
        # OverlapSettings, None: off).
        self.overlap = DecodeOverlap.build(self, decode_overlap)
        # enable_prompt_embeds: steps may embed prompt rows from given embeddings (set by the worker).
        self.prompt_embeds = False
        # Custom logits processors (tessellm.sample.logits_processor.state.LogitsProcessors, set by
        # the worker of a sampling rank); None: none configured, no work per step.
        self.logitsprocs = None

    @property
    def requests(self) -> dict[str, RunnerRequest]:
        return self.batch.requests

    # -- steps -----------------------------------------------------------------------------

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its results."""
        return self.execute_async(sched).result()

    def resolve_all(self) -> None:
        self.steps.resolve_all()

    @runner_grad_mode
    def execute_async(self, sched: SchedulerOutput) -> StepHandle:
        """Launch one step; its ``StepHandle.result()`` waits for the sampled tokens: the
        scheduler's deltas and the cache's transfers applied (``_begin_step``), the step's rows
        in order (``_step_rows``), its host inputs (``_host_inputs``), the forward, the
        sampler (``_launch_sampling``), then the states advanced (``_end_step``)."""
        out = self._begin_step(sched)
        order, states, counts, num_sampled = self._step_rows(sched, out)
        host = self._host_inputs(sched, order, states, counts, num_sampled)
        if self.pooler is not None:  # an embedding model: pooled vectors, nothing sampled
            self._pool(host, sched, states, counts, out)
            for state, n in zip(states, counts):
                state.num_computed_tokens += n
            self.save_external_kv(sched.kv_connector_meta)
            return StepHandle.done(out)
        logits = self._forward(host, states, counts, out)
        if sched.state_saves or sched.state_saves_if_accepted:  # prefix caching: states at
            rows = {st.request_id: (st.num_computed_tokens, n)  # block boundaries (state_prefix.py)
                    for st, n in zip(states, counts) if st.request_id in sched.state_saves_if_accepted}
            self.mamba.save(sched.state_saves, sched.state_saves_if_accepted, rows)
        handle = StepHandle.done(out)
        if logits is not None:
            handle = self._launch_sampling(sched, logits, states, counts, num_sampled, out)
        self._end_step(sched, handle, order, states, counts)
        return handle

    def _begin_step(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """The scheduler's deltas applied to the batch, the cache's transfers (the host tier's,
        a KV connector's loads) done before anything reads or writes it, the requests dropped
        forgotten by every part that keeps per-request state; the step's output to fill."""
        self.batch.apply(sched, samples_here=self.pp.is_last)
        self.guard_external_kv_reads(sched)  # a KV connector's saves still reading reused blocks
        if sched.kv_transfers:  # the host KV tier: before anything reads or writes the cache
            self.apply_kv_transfers(sched.kv_transfers)
        failed_loads, loaded = self.load_external_kv(sched.kv_connector_meta)  # a KV connector's, after
        if self.encoder_cache is not None:
            self.encoder_cache.drop(sched.dropped_request_ids)
        if self.mrope is not None:
            self.mrope.drop(sched.dropped_request_ids)
        if self.mamba is not None:
            self.mamba.drop(sched.dropped_request_ids)
        if self.spec is not None:
            self.spec.drop(sched)
        return ModelRunnerOutput(kv_load_failed=failed_loads, kv_loads_finished=loaded,
                                 kv_saves=self.settled_external_saves())

    def _step_rows(self, sched: SchedulerOutput, out: ModelRunnerOutput) -> tuple:
        """``(order, states, counts, num_sampled)``: the step's requests, decodes first (a
        recurrent-state model's verifies last), their states, query tokens and sampled rows
        (None: one each). Steps ahead with reserved drafts start after the steps in flight."""
        scheduled, ns = sched.num_scheduled_tokens, sched.num_sampled_tokens
        if sched.spec_ahead:  # where they start and what they verify: after the steps in flight
            self.steps.resolve_all()
            scheduled, ns = self.spec.start_ahead(sched, self.batch.requests, out)
        order = sorted(scheduled, key=lambda r: scheduled[r] != 1)
        if self.mamba is not None and self.mamba.spec_tokens:  # recurrent states: verifies last
            order.sort(key=lambda r: self.mamba.is_verify(self.batch.requests[r], scheduled[r]))
        states = [self.batch.requests[r] for r in order]
        counts = [scheduled[r] for r in order]
        # ns values >= 1: all ones exactly when they sum to the count
        one_each = len(ns) == len(order) and sum(ns.values()) == len(ns)
        num_sampled = None if one_each else [ns.get(r, 0) for r in order]
        return order, states, counts, num_sampled

    def _host_inputs(self, sched: SchedulerOutput, order: list, states: list, counts: list,
                     num_sampled):
        """The step's flat host inputs (``build_inputs``), with the LoRA slots, the recurrent
        state slots and multimodal rotary positions of its rows; the steps in flight resolved
        first where the step needs their tokens on the host."""
        if (self.host_sampling or len(self.steps.unresolved) >= 2
                or any(s.params.needs_history for s in states)):
            # at most two steps in flight; penalties and bad words read every token; sampled on the host,
            # the last step's tokens are there already (no device feed)
            self.steps.resolve_all()
        if self.lora is not None:
            self._lora_slots = self.lora.begin_step(sched.lora_loads, sched.lora_slots, order, counts,
                                                    sched.lora_prefetch, sched.lora_unloads)
        self.staging.begin_launch()
        host = build_inputs(states, counts, num_sampled, self.batch.tables, self.block_size,
                            self.steps.input_token, self.table_width_multiple,
                            prompt_rows=bool(self.batch.with_prompt_rows))
        if self.mamba is not None:  # state slots of this step's requests, in row order
            self.mamba.begin_step(states, counts, restores=sched.state_restores,
                                  within=sched.state_saves_within)
        if self.mrope is not None:  # rotary positions: delta added, [3, T] over image tokens
            host.positions = self.mrope.positions(states, counts, host.positions, host.query_start_loc)
        return host

    def _launch_sampling(self, sched: SchedulerOutput, logits, states: list, counts: list,
                         num_sampled, out: ModelRunnerOutput) -> StepHandle:
        """The sampled rows' logits masked (structured output) and sampled, their readback
        started; a ``grammar_deferred`` step's sampling waits for ``sample_deferred``."""
        rows, out_pos, sampling_states, starts = _sampled_rows(states, counts, num_sampled)
        batch = build_sampling_batch(rows, out_pos, self.sampler.device, self.vocab_size,
                                     self.eos_token_ids, budgets=bool(self.batch.with_budget),
                                     id_logprobs=bool(self.batch.with_id_logprobs))

        def sample(bitmask, bitmask_rows: dict[str, int]) -> StepHandle:
            if bitmask is not None:  # structured output: disallowed tokens -> -inf
                apply_grammar_bitmask(logits, [r.request_id for r in rows], bitmask_rows, bitmask,
                                      self.logits_ops, self.mask_upload)
            if self.logitsprocs is None:
                sampled = self._sample(logits, batch, sampling_states, starts)
            else:
                sampled = self._sample_processed(logits, batch, rows, sampling_states, starts, out)
            return self.steps.launch_readback(sampling_states, starts, sampled, out)

        if sched.grammar_deferred:  # the mask comes later (sample_deferred)
            if self._deferred is not None:
                raise RuntimeError("A step still waits for its grammar mask; call sample_deferred first.")
            self._deferred = DeferredSample(sample)
            return self._deferred
        return sample(sched.grammar_bitmask, sched.grammar_bitmask_rows)

    def _end_step(self, sched: SchedulerOutput, handle, order: list, states: list,
                  counts: list) -> None:
        """The states advanced (the one place they move), the blocks the step filled queued
        for a KV connector's saves after it, and speculative decoding's record of the step
        (proposing now where it sampled nothing: a draft fills its KV cache)."""
        for state, n in zip(states, counts):  # the one place the runner's states advance
            state.num_computed_tokens += n
        self.save_external_kv(sched.kv_connector_meta)  # blocks this step filled, queued after it
        if self.spec is not None:
            self.spec.record(handle, order, states, counts, sched, self._step_tensors)
            self._step_tensors = None
            if handle.steps is None:  # sampled nothing: propose now (a draft fills its KV cache)
                self.spec.propose(handle, self.batch.requests)

    def _sample(self, logits, batch, sampling_states, starts):
        """The sampler, or the rejection sampler when drafts carry a draft distribution."""
        verify = None
        if self.spec is not None:
            verify = self.spec.verify_rows(sampling_states, starts, logits.shape[-1], self.sampler.device)
        if verify is None:
            return self.sampler(logits, batch)
        return self.sampler.verify(logits, batch, *verify)

    def _sample_processed(self, logits, batch, rows, sampling_states, starts, out: ModelRunnerOutput):
        """The sampler with the custom logits processors: their batch updated to the step's
        rows (a processor that reads a request's output ids waits there for the steps in
        flight: ``OutputIds``; one that does not, never does). One that raises fails the
        step's requests (``ModelRunnerOutput.failed``), is rebuilt, and the step samples
        without processors so the batch's bookkeeping goes on as usual."""
        self.logitsprocs.forget_failed(self.batch.requests)
        try:
            self.logitsprocs.update(rows, self.steps.resolve_all)
            batch.processors = self.logitsprocs
            return self._sample(logits, batch, sampling_states, starts)
        except LogitsProcessorError as exc:
            self.logitsprocs.reset(rows)
            batch.processors = None
            out.failed.update({r.request_id: str(exc) for r in rows})
            return self._sample(logits, batch, sampling_states, starts)

    def _collect(self, handle: StepHandle, ids: list[int]) -> None:
        collect(handle, ids, self.spec is not None and self.spec.config.force_accept)
        if self.spec is not None:
            self.spec.propose(handle, self.batch.requests)

    @torch.inference_mode()
    def sample_deferred(self, bitmask, bitmask_rows: dict[str, int]) -> None:
        """Sample the last launched step (``grammar_deferred``) with its mask, now known. A
        stage that does not sample has nothing waiting: a no-op."""
        pending, self._deferred = self._deferred, None
        if pending is not None:
            pending.sample(bitmask, bitmask_rows)


def _sampled_rows(states: list[RunnerRequest], counts: list[int], num_sampled: Optional[list[int]]):
    """Per sampled row its request and the output index it samples; the requests that sample
    and their first rows (``starts``, cumulative). ``num_sampled`` None: one row each."""
    if num_sampled is None:  # the usual step: one row per request
        def out_pos(i: int) -> int:
            return states[i].num_computed_tokens + counts[i] - states[i].num_prompt_tokens

        return states, out_pos, states, range(len(states) + 1)
    rows, out_pos, sampling, starts = [], [], [], [0]
    for st, n, s in zip(states, counts, num_sampled):
        if not s:
            continue
        last = st.num_computed_tokens + n - st.num_prompt_tokens  # output index of the last row
        rows.extend([st] * s)
        out_pos.extend(range(last - s + 1, last + 1))
        sampling.append(st)
        starts.append(starts[-1] + s)
    return rows, out_pos.__getitem__, sampling, starts
