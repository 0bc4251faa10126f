"""The decode micro-batch overlap (``TESSELLM_DECODE_OVERLAP=1``, off by default): which steps
are split, and the split of their ``AttentionBatch``.

A large pure-decode step is the serial sum of GEMMs at the ridge and a paged attention at the
HBM bandwidth (benchmarks/results/h200-2026-12-05-s14: ~585 TFLOP/s and ~84%). Split into two
micro-batches of rows, one's attention can run on a second stream while the other's GEMMs run
(``models/micro_batches.py`` has the per-layer schedule). The price: every weight is read once
per micro-batch, so the split pays where the GEMMs stay compute-bound at half the rows. Bf16
Llama-3.1-8B on an H200, 256 rows (F, L): the layers' weights are 14.0 GB a step, read twice
when split, +3.3 ms of HBM time at 4.25 TB/s, against the attention's 5.4 ms (F, ~640 keys) or
~12 ms (L, ~1.5k keys) that can hide under the GEMMs; the step's HBM traffic then bounds it at
~11.9 ms (F, now ~13.3) and ~19 ms (L, now ~21): at most ~10% either way, before contention.
Measured on an H100 (benchmarks/results/h100-2026-12-05-s15), contention won: a captured step
of 256 rows took +32% (512 context) and +18% (1536) split, the halves' GEMMs memory-bound and
competing with the attention for HBM; hence off by default (NanoFlow's gains come at ~2k-row
batches, where the halves stay compute-bound).

Which steps: pure decode (one query row per sequence), at least ``min_rows`` rows (graph
steps: the padded size), of a model whose forward and layers are the llama decoder's
(``LlamaForCausalLM`` with ``DecoderLayer`` / ``DecoderAttention`` forwards; so Llama, Mistral,
Qwen2, Qwen3, SmolLM2), one pipeline stage, no tensor parallelism, no LoRA, no speculative
decoding, no pooling. Anything else (mixed prefill + decode steps included) runs unsplit.

The split, for a pure-decode step of n rows cut at h::

    rows          0 .. h-1 | h .. n-1          (graph padding rows, slot -1, at the end)
    seq_lens      [:h]     | [h:]
    block_tables  [:h]     | [h:]              (row slices: contiguous)
    slot_mapping  [:h]     | [h:]
    query_start_loc  [0..h] and [0..n-h]: prefixes of the step's, which is 0, 1, .., n

Without ``Backend.overlap_streams`` (the cpu backend) the micro-batches run one after the
other on one stream, the same schedule: the host tests check its tokens against HF's.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from tessellm import envs
from tessellm.backends.reference.streams import SequentialStreams
from tessellm.core.attention_batch import AttentionBatch
from tessellm.models.micro_batches import MicroBatch, MicroBatches

logger = logging.getLogger(__name__)


class DecodeOverlap:
    """Splits the steps it applies to (``split``); built by ``build`` only when it is on."""

    def __init__(self, kernel, streams, min_rows: int):
        self.kernel = kernel  # the attention kernel: metadata per micro-batch
        self.streams = streams  # OverlapStreams (backends/spec.py)
        self.min_rows = min_rows

    @classmethod
    def build(cls, runner) -> Optional["DecodeOverlap"]:
        """For a ``ModelRunner`` (its model, kernel, backend, pp, lora, spec, pooler): None
        when the variable is off, or (with a warning naming why) the model cannot be split."""
        min_rows = envs.decode_overlap_min_rows()
        if min_rows is None:
            return None
        reason = unsupported(runner)
        if reason is not None:
            logger.warning("TESSELLM_DECODE_OVERLAP is on, but %s: decode steps run unsplit.", reason)
            return None
        backend = runner.backend
        make = getattr(backend, "overlap_streams", None)
        if make is None or getattr(backend, "emulated", False):  # one stream: the same schedule
            make = SequentialStreams
        streams = make()
        logger.info("Decode micro-batch overlap on: pure-decode steps of >= %d rows split in two "
                    "(%s).", min_rows, type(streams).__name__)
        return cls(runner.kernel, streams, min_rows)

    def split(self, batch: AttentionBatch, model) -> Optional[MicroBatches]:
        """The step's two micro-batches, or None when this step runs unsplit."""
        n = batch.num_seqs
        if (batch.num_decodes != n or batch.num_tokens != n or n < max(self.min_rows, 2)
                or batch.key_limits is not None or getattr(model, "aux_hidden_layers", ())):
            return None
        h = n // 2
        return MicroBatches([MicroBatch(slice(0, h), self.kernel.build_metadata(rows(batch, 0, h))),
                             MicroBatch(slice(h, n), self.kernel.build_metadata(rows(batch, h, n)))],
                            self.streams)


def rows(batch: AttentionBatch, start: int, end: int) -> AttentionBatch:
    """Sequences ``start .. end - 1`` of a pure-decode batch (one query row each) as a batch
    of their own; tensors are views of the step's (no launch, graph-capture safe)."""
    m = end - start
    lens = batch.seq_lens_host[start:end]
    return dataclasses.replace(
        batch, num_tokens=m, num_seqs=m, num_decodes=m,
        query_start_loc=batch.query_start_loc[:m + 1],  # 0, 1, .., m: a decode row per sequence
        seq_lens=batch.seq_lens[start:end], block_tables=batch.block_tables[start:end],
        slot_mapping=batch.slot_mapping[start:end], max_query_len=1,
        max_seq_len=max(lens) if lens else batch.max_seq_len,
        query_start_loc_host=batch.query_start_loc_host[:m + 1] if batch.query_start_loc_host else [],
        seq_lens_host=lens)


def unsupported(runner) -> Optional[str]:
    """Why the runner's model cannot be split (None: it can); see the module docstring."""
    from tessellm.models.decoder import DecoderAttention, DecoderLayer
    from tessellm.models.llama import LlamaForCausalLM

    model = runner.model
    if runner.lora is not None:
        return "LoRA adapters are enabled (their slots index the whole step's rows)"
    if runner.spec is not None:
        return "speculative decoding is on"
    if runner.pooler is not None:
        return "the model pools (embeddings) rather than generates"
    if runner.pp.num_stages > 1:
        return "the model runs in pipeline stages"
    if not isinstance(model, LlamaForCausalLM) or type(model).forward is not LlamaForCausalLM.forward:
        return f"{type(model).__name__} has a forward of its own (only the llama decoder splits)"
    for i in range(model.start_layer, model.end_layer):
        layer = model.layers[i]
        if type(layer).forward is not DecoderLayer.forward or not isinstance(layer, DecoderLayer):
            return f"layer {i} ({type(layer).__name__}) is not the llama DecoderLayer"
        if type(layer.self_attn).forward is not DecoderAttention.forward:
            return f"layer {i}'s attention ({type(layer.self_attn).__name__}) has its own forward"
        if getattr(getattr(layer.self_attn.o_proj, "tp", None), "size", 1) > 1:
            return "tensor parallelism is on (not yet: the all-reduces would interleave)"
    return None
