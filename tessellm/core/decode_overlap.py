"""The decode micro-batch overlap (``enable_decode_overlap`` / ``TESSELLM_DECODE_OVERLAP=1``, off
by default): which steps are split into two micro-batches, and the split of their
``AttentionBatch``. ``models/micro_batches.py`` runs the layers: each micro-batch's attention on a
side stream while the main stream runs the other's GEMMs.

Two kinds of split (``decode_overlap_steps``: "mixed", the default, "decode" or "all"):

- **mixed**: a chunked-prefill step of D decode rows and P prefill tokens, D >= ``min_rows``
  and P >= ``min_prefill``, splits into its decodes and its prefill chunks. The decodes'
  attention (HBM-bound: every key of every sequence read once) runs beside the prefill's GEMMs
  (compute-bound at hundreds of rows); the prefill's attention (compute-bound) beside the
  decodes' GEMMs. The price: the decodes' GEMMs read every weight again (14.0 GB of
  Llama-3.1-8B bf16, ~3.3 ms at 4.25 TB/s), which stays hidden where D's GEMMs are
  compute-bound themselves (D >= ~160 rows on an H200: 678 TFLOP/s / 4.27 TB/s) and only then.
  Rough model, F on an H200 (256 x 512 in / 256 out): ~22 us of GEMM a row, ~1.3 s of decode
  attention over the run; today the prefill runs in a few large steps and the 255 pure-decode
  steps pay their attention serially (~6.2 s). With a token budget that spreads the prefill
  (``max_num_batched_tokens`` 1024-4096: decode rows ride along with prefill chunks) most of
  that attention can hide: ~5.2 s at best (~12.5k tok/s against ~10.4k).
- **decode** (session 15's): a pure-decode step of n >= ``min_rows`` rows splits into halves.
  Every weight is read once per half, so it pays only where 128-256-row halves stay
  compute-bound; measured on an H100 (benchmarks/results/h100-2026-12-05-s15) a captured
  256-row step took +32% (512 context) and +18% (1536) split: contention won.

Which models: those whose forward and layers are the llama decoder's (``LlamaForCausalLM`` with
``DecoderLayer`` / ``DecoderAttention`` forwards; so Llama, Mistral, Qwen2, Qwen3, SmolLM2), one
pipeline stage, no tensor parallelism, no LoRA, no speculative decoding, no pooling, no key
limits (images). Every other step runs unsplit.

The split of a step at sequence c (decodes first, ``AttentionBatch``'s order)::

    sequences       0 .. c-1          | c .. S-1
    token rows      0 .. t-1          | t .. N-1          t = query_start_loc[c]
    seq_lens, block_tables            rows [:c] | [c:]    (row slices: views)
    slot_mapping                      rows [:t] | [t:]
    query_start_loc [0 .. t]          | query_start_loc[c:] - t   (the second rebased)

A pure-decode step (graph-captured included: padding rows, slot -1, at the end) has t = c and
query_start_loc = 0, 1, .., N: both parts take a prefix of it (no launch, capture-safe). A
mixed step is eager: the rebased query_start_loc is one subtraction a step, host lists sliced.

Without ``Backend.overlap_streams`` (the cpu backend, an emulated one) the micro-batches run one
after the other on one stream, the same schedule: the host tests check its tokens against HF's.

Concurrent kernels overlap only if both find room on the GPU: cuBLAS sizes a GEMM's grid for
every multiprocessor, and its CTAs can hold them all while the attention's wait. With
``decode_overlap_sm_carveout`` = c the split step's GEMMs are chosen for (SMs - c)
multiprocessors (the cuda backend: cuBLASLt's SM count target, ``backends/cuda/streams.py``),
so the side stream's attention always finds c free; ``benchmarks/tbo_device.sh`` sweeps c.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

from tessellm import envs
from tessellm.backends.reference.streams import SequentialStreams
from tessellm.core.attention_batch import AttentionBatch
from tessellm.models.micro_batches import MicroBatch, MicroBatches

logger = logging.getLogger(__name__)

STEPS = ("mixed", "decode", "all")  # which steps split (``decode_overlap_steps``)


@dataclasses.dataclass(frozen=True)
class OverlapSettings:
    """The switch resolved (``settings``): present only when the overlap is on."""

    min_rows: int = 128  # the fewest decode rows (graph steps: the padded size) a split needs
    sm_carveout: Optional[int] = None  # SMs the split step's GEMMs leave free; None: not limited
    steps: str = "mixed"  # STEPS: prefill + decode steps, pure-decode steps, or both
    min_prefill: int = 512  # a mixed split's fewest prefill tokens beside the decodes


def settings(args) -> Optional[OverlapSettings]:
    """From ``EngineArgs`` (``enable_decode_overlap``, ``decode_overlap_steps``,
    ``decode_overlap_min_batch``, ``decode_overlap_min_prefill``, ``decode_overlap_sm_carveout``),
    each unset one from its variable (``envs``), else the default; None: off."""
    on = getattr(args, "enable_decode_overlap", None)
    if not (envs.decode_overlap() if on is None else on):
        return None

    def pick(name, read, default):
        value = getattr(args, name, None)
        value = read() if value is None else value
        return default if value is None else value

    base = OverlapSettings()
    return OverlapSettings(
        min_rows=pick("decode_overlap_min_batch", envs.decode_overlap_min_rows, base.min_rows),
        sm_carveout=pick("decode_overlap_sm_carveout", envs.decode_overlap_sm_carveout, None),
        steps=pick("decode_overlap_steps", envs.decode_overlap_steps, base.steps),
        min_prefill=pick("decode_overlap_min_prefill", envs.decode_overlap_min_prefill,
                         base.min_prefill))


class DecodeOverlap:
    """Splits the steps it applies to (``split``); built by ``build`` only when it is on."""

    def __init__(self, kernel, streams, config: OverlapSettings, gemm_scope=None):
        self.kernel = kernel  # the attention kernel: metadata per micro-batch
        self.streams = streams  # OverlapStreams (backends/spec.py)
        self.config = config
        # () -> context manager held while a split step's layers are queued (the GEMMs' SM
        # carve-out, ``OverlapStreams.gemm_sm_carveout``); None: nothing held
        self.gemm_scope = gemm_scope
        # steps split so far, by kind (a captured decode graph counts once, at its capture)
        self.splits = {"mixed": 0, "decode": 0}

    @property
    def min_rows(self) -> int:
        return self.config.min_rows

    @classmethod
    def build(cls, runner, config: Optional[OverlapSettings]) -> Optional["DecodeOverlap"]:
        """For a ``ModelRunner`` (its model, kernel, backend, pp, lora, spec, pooler): None
        when ``config`` is None (off), or (with a warning naming why) the model cannot be split."""
        if config is None:
            return None
        reason = unsupported(runner)
        if reason is not None:
            logger.warning("The decode overlap is on, but %s: steps run unsplit.", reason)
            return None
        backend = runner.backend
        make = getattr(backend, "overlap_streams", None)
        if make is None or getattr(backend, "emulated", False):  # one stream: the same schedule
            make = SequentialStreams
        streams = make()
        scope = None
        if config.sm_carveout is not None:
            carve = getattr(streams, "gemm_sm_carveout", None)
            if carve is None:
                logger.warning("decode_overlap_sm_carveout=%d is ignored: backend %s (or this "
                               "torch) has no GEMM SM carve-out (OverlapStreams.gemm_sm_carveout).",
                               config.sm_carveout, backend.name)
            else:
                carve(config.sm_carveout)  # made once now: a carve-out out of range fails here
                scope = functools.partial(carve, config.sm_carveout)
        logger.info("Decode micro-batch overlap on: %s steps with >= %d decode rows (mixed: and "
                    ">= %d prefill tokens) split in two (%s, GEMM SM carve-out %s).", config.steps,
                    config.min_rows, config.min_prefill, type(streams).__name__,
                    config.sm_carveout if scope is not None else "none")
        return cls(runner.kernel, streams, config, scope)

    def cut(self, batch: AttentionBatch) -> Optional[int]:
        """The sequence this step splits at, or None when it runs unsplit."""
        c, n = self.config, batch.num_decodes
        if batch.key_limits is not None or n < max(c.min_rows, 1):
            return None
        if n == batch.num_seqs == batch.num_tokens:  # pure decode: halves (an odd n: the
            return n // 2 if c.steps != "mixed" and n >= 2 else None  # second has one more)
        if c.steps == "decode" or batch.num_tokens - n < max(c.min_prefill, 1):
            return None
        return n  # mixed: the decodes | the prefill chunks

    def split(self, batch: AttentionBatch, model) -> Optional[MicroBatches]:
        """The step's two micro-batches, or None when this step runs unsplit."""
        c = self.cut(batch) if not getattr(model, "aux_hidden_layers", ()) else None
        if c is None:
            return None
        first, second = sequences(batch, 0, c), sequences(batch, c, batch.num_seqs)
        t = first.num_tokens
        self.splits["decode" if batch.num_decodes == batch.num_seqs else "mixed"] += 1
        return MicroBatches([MicroBatch(slice(0, t), self.kernel.build_metadata(first)),
                             MicroBatch(slice(t, batch.num_tokens), self.kernel.build_metadata(second))],
                            self.streams, self.gemm_scope)


def sequences(batch: AttentionBatch, start: int, end: int) -> AttentionBatch:
    """Sequences ``start .. end - 1`` of ``batch`` as a batch of their own (see the module
    docstring): tensors are views of the step's, but for a rebased ``query_start_loc`` where
    the part starts after a prefill row (eager steps only)."""
    m = end - start
    decodes = max(0, min(batch.num_decodes, end) - start)
    if decodes == m:  # one query row per sequence: t0 = start, query_start_loc a prefix
        t0, t1 = start, end
        qsl = batch.query_start_loc[:m + 1]
        qsl_host = batch.query_start_loc_host[:m + 1] if batch.query_start_loc_host else []
        max_query = 1
    else:  # prefill chunks: eager, host lists present
        t0, t1 = batch.query_start_loc_host[start], batch.query_start_loc_host[end]
        qsl = batch.query_start_loc[start:end + 1]
        qsl = qsl - t0 if t0 else qsl
        qsl_host = [x - t0 for x in batch.query_start_loc_host[start:end + 1]]
        max_query = max(b - a for a, b in zip(qsl_host, qsl_host[1:]))
    lens = batch.seq_lens_host[start:end]
    return dataclasses.replace(
        batch, num_tokens=t1 - t0, num_seqs=m, num_decodes=decodes, query_start_loc=qsl,
        seq_lens=batch.seq_lens[start:end], block_tables=batch.block_tables[start:end],
        slot_mapping=batch.slot_mapping[t0:t1], max_query_len=max_query,
        max_seq_len=max(lens) if lens else batch.max_seq_len,
        query_start_loc_host=qsl_host, seq_lens_host=lens)


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
