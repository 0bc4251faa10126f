"""The model runner's forward of a step: eager, a captured decode / verify graph, padded to a
compiling device's buckets, or pooled; the logits of the step's sampled rows.

A mixin of ``ModelRunner`` (tessellm/core/model_runner.py), which owns the state used here:
``model``, ``kernel``, ``backend``, ``device``, ``pp`` / ``io`` (pipeline stage, its receive and
send), ``staging`` (pinned host -> device copies), ``steps`` (the async feed of the last step's
tokens), ``batch`` (block tables), ``buckets`` / ``host_sampling`` (a compiling device),
``graph_runner`` / ``verify_graphs`` (captured steps, runner_graphs.py), ``lora`` /
``_lora_slots`` / ``_lora_graphs``, ``mamba`` (recurrent-state slots), ``encoder_cache`` /
``image_key_limits`` (images), ``prompt_embeds`` (given prompt embeddings), ``bidirectional`` /
``pooler`` (encoders), ``spec`` / ``_step_tensors`` (a proposer reading the step's hidden
states) and ``prompt_logprob_chunk``. ``_graph_size`` and ``_metadata`` come from
``RunnerGraphs``.

Which forward a step takes::

    a pooling model                      -> _pool: eager (padded to buckets where set), pooled
    buckets set (a compiling device)     -> _forward_bucketed: padded, one program per bucket
    a capture size fits (_graph_size),
      no images / given embeddings       -> the captured decode graph (graph_runner.run)
    every request verifies k drafts,
      no images, LoRA only if captured   -> the captured verify graph (verify_graphs.run)
    otherwise                            -> eager: _eager_tensors -> model -> compute_logits

The eager and bucketed paths also compute the step's prompt logprobs (``host.prompt_lp_rows``)
from its hidden states.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from tessellm.core.attention_batch import AttentionBatch
from tessellm.core.input_builder import HostInputs
from tessellm.core.prompt_embeds import embed_step, step_embed_rows
from tessellm.core.runner_output import prompt_logprobs
from tessellm.core.shape_buckets import pad_host_inputs
from tessellm.core.step import ModelRunnerOutput, SchedulerOutput
from tessellm.spec_decode.proposer import StepTensors


class RunnerForward:
    """The step's forward and its device inputs (see above)."""

    def _pool(self, host: HostInputs, sched: SchedulerOutput, states, counts, out: ModelRunnerOutput) -> None:
        """An eager forward of the step; ``out.pooled`` for the requests whose prompt ends in it."""
        self.pooler.drop(sched.dropped_request_ids)
        run, lora_slots = host, self._lora_slots
        if self.buckets is not None:  # padded rows go after the real ones: rows stay aligned
            run, lora_slots = pad_host_inputs(host, self.buckets, len(states), self.batch.tables.width), None
        limits = None
        if self.bidirectional:  # an encoder: every row sees its whole sequence
            from tessellm.pooling.encoder import encoder_key_limits

            limits = encoder_key_limits(states, counts)
        ids, positions, attn, _ = self._eager_tensors(run, counts, lora_slots, limits)
        hidden = self.model(ids, positions, self.kernel.build_metadata(attn), self.io.receive(run.num_tokens))
        if not self.io.send(hidden):
            out.pooled = self.pooler(hidden, host.query_start_loc, states, counts)

    def _forward(self, host: HostInputs, states, counts, out: ModelRunnerOutput) -> Optional[torch.Tensor]:
        """Run the model; the logits of the sampled rows, or None when nothing samples here."""
        num_rows = host.logits_indices.shape[0]
        mm = None  # image placeholders in this step: (rows, features); eager only
        if self.encoder_cache is not None:
            mm = self.encoder_cache.step_embeds(states, counts, host.query_start_loc)
        given = None  # prompt rows given as embeddings (core/prompt_embeds.py); eager only
        if self.prompt_embeds and self.pp.is_first:
            given = step_embed_rows(states, counts, host.query_start_loc, self.device)
        if self.buckets is not None:
            return self._forward_bucketed(host, states, counts, num_rows, mm, given)
        padded = None if mm is not None or given is not None else self._graph_size(host, states)
        if padded is not None:
            inputs = [self.staging.to_device(i, a) for i, a in enumerate(host.pad(padded))]
            if self._lora_graphs:  # the LoRA slot of each row; padded rows use none
                slots = np.full(padded, -1, dtype=np.int32)
                if self._lora_slots is not None:
                    slots[:host.num_tokens] = self._lora_slots
                inputs.insert(4, self.staging.to_device(10, slots))  # the table stays last
            if self.mamba is not None:  # each row's state slot; padded rows the scratch slot
                inputs.insert(-1, self.staging.to_device(11, self.mamba.graph_slots(padded)))
            inputs[0] = self.steps.apply_feed(inputs[0], host.feed, self.staging)
            rows = None if num_rows == host.num_tokens else self.staging.to_device(8, host.logits_indices)
            self.staging.inputs_queued()
            logits = self.graph_runner.run(inputs)[:host.num_tokens]
            if not num_rows:
                return None
            return logits if rows is None else logits[rows]
        bucket = None  # LoRA steps verify eagerly unless the verify graphs take adapter slots
        graphs = self.verify_graphs
        if graphs is not None and mm is None and (self._lora_slots is None or graphs.lora is not None):
            bucket = graphs.bucket(host, counts)
        if bucket is not None:  # every request verifies k drafts: a captured verify step
            return graphs.run(host, *bucket, self.staging.to_device, self.staging.inputs_queued,
                              self._lora_slots)
        ids, positions, attn, rows = self._eager_tensors(host, counts, self._lora_slots,
                                                         self._key_limits(host, states, counts, mm))
        hidden = self.model(ids, positions, self._metadata(attn), self.io.receive(host.num_tokens),
                            **_embeds_kwargs(self.model, ids, mm, given))
        if self.io.send(hidden):
            return None
        if self.spec is not None and self.spec.wants_tensors:
            self._step_tensors = StepTensors(ids, positions, attn.slot_mapping, attn, rows, None, hidden,
                                             getattr(self.model, "aux_hidden_states", None))
        if host.prompt_lp_rows:
            prompt_logprobs(self.model, hidden, host.prompt_lp_rows, self.prompt_logprob_chunk)
        if not num_rows:
            return None
        return self.model.compute_logits(hidden[rows])

    def _forward_bucketed(self, host: HostInputs, states, counts, num_rows: int,
                          mm=None, given=None) -> Optional[torch.Tensor]:
        """The step padded to the kernel's buckets, run as one program (XLA: the graph is cut
        after the logits), its logits on the host; see shape_buckets.py."""
        limits = self._key_limits(host, states, counts, mm)
        host = pad_host_inputs(host, self.buckets, len(states), self.batch.tables.width)
        lora_slots = self._lora_slots
        if lora_slots is not None:  # padding rows: no adapter (-1)
            lora_slots = np.concatenate([lora_slots, np.full(host.num_tokens - len(lora_slots), -1,
                                                             dtype=lora_slots.dtype)])
        ids, positions, attn, rows = self._eager_tensors(host, counts, lora_slots, limits)
        hidden = self.model(ids, positions, self.kernel.build_metadata(attn), self.io.receive(host.num_tokens),
                            **_embeds_kwargs(self.model, ids, mm, given))
        logits = self.model.compute_logits(hidden[rows])  # always: one program per bucket
        if host.prompt_lp_rows:
            prompt_logprobs(self.model, hidden, host.prompt_lp_rows, self.prompt_logprob_chunk)
        self.backend.synchronize()  # XLA: compile (once per bucket) and run the step
        if not num_rows:
            return None
        return logits.cpu()[:num_rows] if self.host_sampling else logits[:num_rows]

    def _key_limits(self, host: HostInputs, states, counts, mm) -> Optional[np.ndarray]:
        """The step's ``AttentionBatch.key_limits`` (a model whose image tokens see the whole
        image, in a step that computes image tokens), else None."""
        if not self.image_key_limits or (mm is None and self.encoder_cache is not None):
            return None  # (a later pipeline stage has no encoder cache: limits from the spans)
        from tessellm.multimodal.image_spans import image_key_limits

        return image_key_limits(states, counts, host.positions, host.query_start_loc)

    def _eager_tensors(self, host: HostInputs, counts: list[int], lora_slots=None,
                       key_limits: Optional[np.ndarray] = None):
        """The step's inputs on the device, through pinned staging, and its AttentionBatch
        (``lora_slots``: the LoRA slot per token row, set on the layers' ``LoRABatch``;
        ``key_limits``: per row, the last key it sees, padded rows causal)."""
        put = self.staging.to_device
        ids = self.steps.apply_feed(put(0, host.input_ids), host.feed, self.staging)
        positions, slots, seq_lens = put(1, host.positions), put(2, host.slot_mapping), put(3, host.seq_lens)
        table, qsl, rows = put(4, host.block_table), put(7, host.query_start_loc), put(8, host.logits_indices)
        if self.lora is not None:
            self.lora.batch.set(None if lora_slots is None else put(10, lora_slots))
        full_limits = None
        if key_limits is not None:  # per row the last key it sees; padded rows causal
            full_limits = host.positions.astype(np.int32)
            full_limits[:len(key_limits)] = key_limits
        limits = None if full_limits is None else put(9, full_limits)  # before the set's event
        self.staging.inputs_queued()
        attn = AttentionBatch(
            num_tokens=host.num_tokens, num_seqs=len(counts), num_decodes=host.num_decodes,
            query_start_loc=qsl, seq_lens=seq_lens, block_tables=table, slot_mapping=slots,
            max_query_len=max(counts), max_seq_len=int(host.seq_lens.max()),
            query_start_loc_host=host.query_start_loc.tolist(), seq_lens_host=host.seq_lens.tolist())
        if full_limits is not None:
            attn.key_limits, attn.key_limits_host = limits, full_limits.tolist()
        return ids, positions, attn, rows


def _embeds_kwargs(model, ids, mm, given) -> dict:
    """The forward's image features (``mm_embeds``) or given prompt embeddings
    (``inputs_embeds``, core/prompt_embeds.py) for this step; {} for a plain token step."""
    if mm is not None:
        return {"mm_embeds": mm}
    if given is not None:
        return {"inputs_embeds": embed_step(model, ids, given)}
    return {}
