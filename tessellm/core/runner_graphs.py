"""The model runner's captured graphs: decode steps, verify steps, precompiled buckets.

A mixin of ``ModelRunner`` (tessellm/core/model_runner.py), which owns the state used here:
``graph_runner`` (the backend's, None: eager), ``buckets`` (a compiling device's shapes),
``kernel``, ``model``, ``lora``, ``mamba`` (recurrent-state slots), ``spec``, ``overlap`` (the decode micro-batch split, or
None), ``verify_graph_factory`` / ``verify_graphs``, and the flags ``_graphs_ready`` /
``_lora_graphs``. Captured decode steps have one query token per row, padded to the graph
runner's capture sizes; verify steps (speculative decoding) have q per sequence
(``spec_decode/verify_graphs.py``).

One logits buffer for every graph: a device graph runner keeps each captured step's output as
a static buffer (``static_outputs``), so a ``[size, vocab]`` logits output per graph would
hold ~1 GiB for Llama-3.1-8B at the default sizes (8.3 GiB at max_num_seqs 1024). Instead every
captured step (decode and verify) copies its logits into rows ``[:n]`` of one buffer of
``[most rows, vocab]`` (``graph_logits``), inside the graph, and returns that view; the logits
themselves are transient in the graphs' pool, which every graph reuses::

    graph n:  hidden = model(...);  graph_logits[:n] <- compute_logits(hidden);  -> graph_logits[:n]

A replay overwrites what the previous one returned: the runner samples a step's logits (queues
the sampler on the same stream) before it launches the next step, structured output's deferred
sampling included (the engine samples it before anything else is launched), and nothing keeps
them past that (gathered sampled rows are copies).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from tessellm import envs
from tessellm.backends.reference.recurrent_verify import verify_ops_capturable
from tessellm.core.attention_batch import AttentionBatch
from tessellm.core.input_batch import RunnerRequest
from tessellm.core.input_builder import HostInputs
from tessellm.core.shape_buckets import runner_grad_mode

logger = logging.getLogger(__name__)


class RunnerGraphs:
    """Graph capture and the choice, per step, of a captured graph (``_graph_size``)."""

    def capture_graphs(self) -> None:
        """Capture the decode step (forward + logits) for each of the graph runner's sizes."""
        if self.graph_runner is None:
            return
        if self.buckets is not None:  # bucketed steps run as they are, never replayed
            if hasattr(self.graph_runner, "precompile"):  # a compiling device: compile them now
                self._precompile_buckets()
            return
        if not getattr(self.kernel, "supports_graph_capture", False):
            logger.warning("Attention kernel %r does not declare supports_graph_capture; running "
                           "eagerly without the backend's graph runner.", self.kernel.name)
            self.graph_runner = None
            return
        width = -(-self.max_model_len // self.block_size)
        self.graph_logits = None  # allocated by the first step (a warm-up), at graph_logits_rows
        self._share_logits = getattr(self.graph_runner, "static_outputs", False)
        self.graph_logits_rows = max((*self.graph_runner.capture_sizes, *self._verify_rows()))
        self._arange = torch.arange(max(self.graph_runner.capture_sizes) + 1, dtype=torch.int32,
                                    device=self.device)
        # LoRA: graphs cover adapter steps when the backend's ops are capturable; else they
        # hold the base model only and steps with adapters run eagerly (docs/lora.md).
        self._lora_graphs = self.lora is not None and self.lora.graph_capturable

        def make_inputs(n: int):
            lora = (torch.full((n,), -1, dtype=torch.int32, device=self.device),) if self._lora_graphs else ()
            states = () if self.mamba is None else (  # recurrent-state slot per row
                torch.full((n,), self.mamba.scratch, dtype=torch.int32, device=self.device),)
            return (torch.zeros(n, dtype=torch.int64, device=self.device),  # input ids
                    torch.zeros(n, dtype=torch.int64, device=self.device),  # positions
                    torch.full((n,), -1, dtype=torch.int64, device=self.device),  # slots
                    torch.ones(n, dtype=torch.int32, device=self.device),  # seq lens
                    *lora,  # LoRA slot per row (-1: none)
                    *states,  # Mamba / DeltaNet state slot per row (padded rows: scratch)
                    torch.zeros((n, width), dtype=torch.int32, device=self.device))  # tables (last)

        with torch.inference_mode():
            self.graph_runner.capture(self._decode_step, make_inputs)
            self._capture_verify_graphs()
        self._graphs_ready = True

    def graph_memory_estimate(self) -> int:
        """Bytes ``capture_graphs`` will allocate, for the KV cache's sizing before it
        (``core/memory_profile.graph_memory_estimate``; ``profile_run`` measured its inputs),
        speculative decoding's verify graphs included (a drafter's own graphs: the worker adds
        ``SpecDecodeRunner.graph_memory_estimate``). 0
        without captured decode graphs (eager, or a compiling device's buckets)."""
        from tessellm.core.memory_profile import graph_memory_estimate

        runner = self.graph_runner
        if (runner is None or self.buckets is not None
                or not getattr(self.kernel, "supports_graph_capture", False)):
            return 0
        per_token = self.profile_peak_bytes / max(1, self.profile_tokens)
        verify = ()
        spec = self.spec
        if self._verify_captured():
            from tessellm.spec_decode.verify_graphs import capture_sizes

            # the verify graphs (_capture_verify_graphs): a runner per q, S sequences of q rows
            sizes = capture_sizes(spec.max_num_seqs, spec.config.disable_by_batch_size)
            verify = [[n * q for n in sizes] for q in range(2, spec.config.num_speculative_tokens + 2)]
        return graph_memory_estimate(getattr(runner, "capture_sizes", ()), self.logits_row_bytes,
                                     per_token, verify, getattr(runner, "static_outputs", False))

    def _verify_rows(self) -> tuple[int, ...]:
        """The most token rows of a verify graph (``(S * q,)``), () where none is captured."""
        spec = self.spec
        if not self._verify_captured():
            return ()
        from tessellm.spec_decode.verify_graphs import max_verify_rows

        rows = max_verify_rows(spec.max_num_seqs, spec.config)
        return (rows,) if rows else ()

    def _verify_captured(self, log: bool = False) -> bool:
        """Whether speculative decoding's verify steps are captured (``_capture_verify_graphs``;
        the reserve and the logits buffer count them only then): not for a drafter that reads
        the step's tensors, nor on a recurrent-state model whose verify steps stay eager
        (``log``: say why)."""
        spec = self.spec
        if spec is None or self.verify_graph_factory is None or spec.wants_tensors:
            return False
        if self.mamba is not None and not envs.recurrent_verify_graphs():
            if log:
                logger.info("Speculative decoding on a recurrent-state model: verify steps run "
                            "eagerly (TESSELLM_RECURRENT_VERIFY_GRAPHS=0).")
            return False
        if self.mamba is not None and not verify_ops_capturable(self.mamba.layers[0].ops):
            if log:
                logger.info("Speculative decoding: the backend's own recurrent verify ops do not "
                            "declare recurrent_verify_graphs; verify steps run eagerly (decode "
                            "steps replay their graphs).")
            return False
        return True

    def _graph_output(self, logits: torch.Tensor) -> torch.Tensor:
        """What a captured step returns for its ``logits`` (``[n, vocab]``): rows ``[:n]`` of
        ``graph_logits``, the one buffer of every graph (see the module docstring), where the
        graph runner keeps static outputs; else ``logits``."""
        if not self._share_logits:
            return logits
        buf = self.graph_logits
        if buf is None:  # the first (warm-up) step: outside capture, on the capture stream
            buf = self.graph_logits = logits.new_empty((self.graph_logits_rows, *logits.shape[1:]))
        out = buf[:logits.shape[0]]
        out.copy_(logits)
        return out

    def release_graph_logits(self) -> None:
        """Drop the graphs' logits buffer (sleep mode, with the graphs)."""
        self.graph_logits = None

    def _capture_verify_graphs(self) -> None:
        """Speculative decoding: graphs of the verify step (q = 2..k+1 tokens per sequence)."""
        spec = self.spec
        if self.lora is not None:
            self.lora.batch.set(None)  # without capturable LoRA ops verify graphs hold the base model
        if spec is not None:
            spec.proposer.capture_graphs()  # a draft model's own graphs (the target's are done)
        if not self._verify_captured(log=True):
            return
        from tessellm.spec_decode.verify_graphs import VerifyGraphs, capture_sizes

        sizes = capture_sizes(spec.max_num_seqs, spec.config.disable_by_batch_size)
        if sizes:
            self.verify_graphs = VerifyGraphs(self.model, self.kernel, self.device, self.max_model_len,
                                              self.block_size, self.verify_graph_factory,
                                              spec.config.num_speculative_tokens + 1, sizes,
                                              self.lora.batch if self._lora_graphs else None,
                                              self.mamba, self._graph_output)
            self.verify_graphs.capture()

    @runner_grad_mode
    def _precompile_buckets(self) -> None:
        """Every bucketed step shape compiled before ready (``shape_buckets.precompile_steps``)."""
        from tessellm.core.shape_buckets import precompile_steps

        self.precompiled = precompile_steps(self)
        logger.info("Precompiled %d bucketed step shapes: %d XLA programs in %.1fs",
                    self.precompiled["shapes"], self.precompiled["compiled"], self.precompiled["seconds"])

    def _decode_step(self, input_ids, positions, slot_mapping, seq_lens, *rest):
        """The captured step: the graph's static buffers are its AttentionBatch (one query
        token per row; padded rows have slot -1 and length 0), the block table last, and
        before it, with LoRA graphs, each row's adapter slot (prepared inside the graph), then,
        for a model with recurrent states, each row's state slot (padded rows: the cache's
        scratch slot), from which the step's ``MambaBatch`` is set inside the graph."""
        n = input_ids.shape[0]
        block_tables = rest[-1]
        if self.lora is not None:
            self.lora.batch.set(rest[0] if self._lora_graphs else None)
        if self.mamba is not None:
            self.mamba.decode_batch(rest[-2], self._arange[:n + 1])
        batch = AttentionBatch(num_tokens=n, num_seqs=n, num_decodes=n,
                               query_start_loc=self._arange[:n + 1], seq_lens=seq_lens,
                               block_tables=block_tables, slot_mapping=slot_mapping,
                               max_query_len=1, max_seq_len=self.max_model_len,
                               query_start_loc_host=[], seq_lens_host=[])
        hidden = self.model(input_ids, positions, self._metadata(batch))
        return self._graph_output(self.model.compute_logits(hidden))

    def _metadata(self, batch: AttentionBatch):
        """The kernel's metadata for the step, or its micro-batches where the decode overlap
        splits it (``core/decode_overlap.py``)."""
        split = self.overlap.split(batch, self.model) if self.overlap is not None else None
        return split if split is not None else self.kernel.build_metadata(batch)

    def _graph_size(self, host: HostInputs, states: list[RunnerRequest]) -> Optional[int]:
        if not self._graphs_ready or not host.all_decode:
            return None
        if self._lora_slots is not None and not self._lora_graphs:
            return None  # graphs hold the base model only: a step with adapters runs eagerly
        if host.any_prompt_logprobs or (self.spec is not None and self.spec.wants_tensors):
            return None  # the graph returns logits only
        return self.graph_runner.padded_size(len(states))
