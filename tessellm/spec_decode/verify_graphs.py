"""Captured verify steps: every sequence verifies k drafts (q = k + 1 query tokens each), replayed
from a graph per (q, batch bucket) like the decode graphs.

A verify step at small batch is as memory-bound as a decode step, so eager per-layer launches
would eat the gain. Inputs are shaped per sequence so the backend's graph runner (which keys
on dim 0) buckets by sequences::

    input_ids, positions, slot_mapping:  [S, q]   (flattened to S*q token rows inside)
    seq_lens:                            [S]      padding sequences: q (they read block 0,
    block_tables:                        [S, W]    write nothing: slot -1)
    output logits:                       [S, q, vocab]   (a view of the logits buffer every
                                                          captured step shares, runner_graphs.py)

The attention batch has no decodes: one prefill-with-context chunk of q tokens per sequence
(``query_start_loc = arange(S + 1) * q``), the path the conformance suite checks ("verify").
A step is replayed only when every request has q tokens and samples all q rows (no prompt
logprobs, no async feed); anything else runs eagerly.

A model with recurrent states (Mamba2 mixers, gated DeltaNet) takes two more inputs, from which
the step's ``MambaBatch`` is set inside the graph (``MambaStateCache.verify_batch``)::

    state slots:   [S]      each sequence's own slot      padding sequences: the scratch slot
    token slots:   [S, q]   the slot of the state after each token (core/mamba_state.py)

and such a step replays only when all its sequences verify drafts (``all_verify``).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np
import torch

from tessellm.core.attention_batch import AttentionBatch

logger = logging.getLogger(__name__)

LADDER = (1, 2, 4, 8, 12, 16, 24, 32)


def capture_sizes(max_num_seqs: int, disable_by_batch_size: int) -> tuple[int, ...]:
    """Batch buckets worth a verify graph: below the load policy's cut-off (at most 32)."""
    top = disable_by_batch_size - 1 if disable_by_batch_size else 32
    return tuple(s for s in LADDER if s <= min(top, max_num_seqs))


def max_verify_rows(max_num_seqs: int, config) -> int:
    """The most token rows of a captured verify step (``S * q``) under speculative ``config``
    (0: none is captured): what the target's attention kernel must take as one step of equal
    query lengths (``AttentionSpec.max_num_seqs``)."""
    sizes = capture_sizes(max_num_seqs, config.disable_by_batch_size)
    return max(sizes) * (config.num_speculative_tokens + 1) if sizes else 0


class VerifyGraphs:
    def __init__(self, model, kernel, device: torch.device, max_model_len: int, block_size: int,
                 make_runner: Callable[[tuple[int, ...]], object], max_q: int, sizes: tuple[int, ...],
                 lora_batch=None, mamba=None, output: Optional[Callable] = None):
        self.model = model
        self.kernel = kernel
        self.device = device
        self.max_model_len = max_model_len
        self.width = -(-max_model_len // block_size)
        self.make_runner = make_runner  # capture sizes -> a fresh graph runner (or None)
        self.max_q = max_q
        self.sizes = tuple(sizes)
        self.runners: dict[int, object] = {}  # q -> graph runner of its buckets
        self._qsl: dict[int, torch.Tensor] = {}
        # Multi-LoRA with capturable ops: the layers' LoRABatch; each graph then takes every
        # token row's adapter slot ([S, q] int32, -1: none) before the table and prepares it
        # inside the graph, so verify steps with adapters replay too. None: base model only.
        self.lora = lora_batch
        # Recurrent states (``core/mamba_state.MambaStateCache``): the graphs then take each
        # sequence's state slot ([S] int32) and token slots ([S, q] int32) before the table.
        self.mamba = mamba
        # logits [S * q, vocab] -> what the graph returns: the model runner's view of the one
        # logits buffer every captured step writes (core/runner_graphs.py); None: the logits.
        self.output = output or (lambda logits: logits)

    def capture(self) -> None:
        for q in range(2, self.max_q + 1):
            runner = self.make_runner(self.sizes)
            if runner is None:
                return
            self._qsl[q] = torch.arange(max(self.sizes) + 1, dtype=torch.int32, device=self.device) * q
            runner.capture(self._step, lambda s, q=q: self._inputs(s, q))
            self.runners[q] = runner
        logger.info("Captured verify graphs for q = 2..%d, %d batch sizes each", self.max_q, len(self.sizes))

    def _inputs(self, s: int, q: int) -> tuple:
        dev = self.device
        return (torch.zeros((s, q), dtype=torch.int64, device=dev),  # input ids
                torch.arange(q, dtype=torch.int64, device=dev).repeat(s, 1),  # positions
                torch.full((s, q), -1, dtype=torch.int64, device=dev),  # slots
                torch.full((s,), q, dtype=torch.int32, device=dev),  # seq lens
                *self._lora_input(s, q),  # LoRA slot per token row (LoRA graphs only)
                *self._state_inputs(s, q),  # state and token slots (recurrent models only)
                torch.zeros((s, self.width), dtype=torch.int32, device=dev))  # tables (last)

    def _lora_input(self, s: int, q: int) -> tuple:
        if self.lora is None:
            return ()
        return (torch.full((s, q), -1, dtype=torch.int32, device=self.device),)

    def _state_inputs(self, s: int, q: int) -> tuple:
        if self.mamba is None:
            return ()
        scratch = self.mamba.scratch
        return (torch.full((s,), scratch, dtype=torch.int32, device=self.device),
                torch.full((s, q), scratch, dtype=torch.int32, device=self.device))

    def _step(self, input_ids, positions, slot_mapping, seq_lens, *rest):
        s, q = input_ids.shape
        block_tables = rest[-1]
        if self.lora is not None:
            self.lora.set(rest[0].reshape(-1))
        if self.mamba is not None:
            self.mamba.verify_batch(rest[-3], rest[-2].reshape(-1), self._qsl[q][:s + 1], q)
        batch = AttentionBatch(num_tokens=s * q, num_seqs=s, num_decodes=0,
                               query_start_loc=self._qsl[q][:s + 1], seq_lens=seq_lens,
                               block_tables=block_tables, slot_mapping=slot_mapping.reshape(-1),
                               max_query_len=q, max_seq_len=self.max_model_len,
                               query_start_loc_host=[], seq_lens_host=[])
        hidden = self.model(input_ids.reshape(-1), positions.reshape(-1), self.kernel.build_metadata(batch))
        return self.output(self.model.compute_logits(hidden)).view(s, q, -1)

    def bucket(self, host, counts: list[int]) -> Optional[tuple[int, int]]:
        """(q, padded sequences) when this step can replay a verify graph, else None."""
        q = counts[0]
        if q not in self.runners or host.feed or host.any_prompt_logprobs:
            return None
        if any(n != q for n in counts) or host.logits_indices.shape[0] != host.num_tokens:
            return None
        if self.mamba is not None and not self.mamba.all_verify(len(counts)):
            return None
        padded = self.runners[q].padded_size(len(counts))
        return None if padded is None else (q, padded)

    def run(self, host, q: int, padded: int, to_device, queued, lora_slots=None) -> torch.Tensor:
        """The logits [S * q, vocab] of every token row (all are sampled), through the graph
        (``lora_slots``: int32 adapter slot per token row, -1 none; None: no row has one)."""
        s = len(host.seq_lens)
        ids = _padded(host.input_ids.reshape(s, q), padded, 0)
        positions = _padded(host.positions.reshape(s, q), padded, 0)
        slots = _padded(host.slot_mapping.reshape(s, q), padded, -1)  # padding writes nothing
        seq_lens = _padded(host.seq_lens, padded, q)
        table = _padded(host.block_table, padded, 0)
        inputs = [to_device(i, a) for i, a in enumerate((ids, positions, slots, seq_lens, table))]
        if self.lora is not None:  # padding sequences use no adapter; the table stays last
            adapters = np.full((padded, q), -1, dtype=np.int32)
            if lora_slots is not None:
                adapters[:s] = np.asarray(lora_slots).reshape(s, q)
            inputs.insert(4, to_device(10, adapters))
        if self.mamba is not None:  # padding sequences in the scratch slot; the table stays last
            state_slots, token_slots = self.mamba.graph_verify_slots(padded)
            inputs[-1:-1] = [to_device(12, state_slots), to_device(13, token_slots)]
        queued()
        return self.runners[q].run(inputs)[:s].reshape(s * q, -1)


def _padded(a: np.ndarray, rows: int, fill: int) -> np.ndarray:
    """``a`` with ``rows`` rows, the new ones ``fill``; ``a`` itself (no copy) when it has them."""
    if a.shape[0] == rows:
        return a
    out = np.full((rows, *a.shape[1:]), fill, dtype=a.dtype)
    out[:a.shape[0]] = a
    return out
