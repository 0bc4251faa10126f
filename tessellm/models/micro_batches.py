"""A decode step's layers over micro-batches: one micro-batch's attention on a side stream
while the main stream runs another's GEMMs (the decode micro-batch overlap, in the spirit of
NanoFlow's nano-batches and SGLang's two-batch overlap; ``core/decode_overlap.py`` decides
when a step is split and builds this object, the model's forward hands it its layers).

A decoder layer is cut into three parts (``DecoderLayer``):

    pre(p, l)   input norm + qkv projection (+ rotary)      main stream: GEMM
    attn(p, l)  paged attention (cache write included)      side stream: HBM-bound
    post(p, l)  o_proj + post-attention norm + MLP          main stream: GEMMs

and the parts of micro-batches a, b interleave so that each attention runs beside the other
micro-batch's GEMMs (b trails a by half a layer)::

    main:  pre(a,0) pre(b,0) | post(a,0) pre(a,1) | post(b,0) pre(b,1) | post(a,1) pre(a,2) ...
    side:           attn(a,0)| attn(b,0)          | attn(a,1)          | attn(b,1)          ...

    pre(p, l) --record--> side waits, runs attn(p, l) --record--> main waits, runs post(p, l)

Invariants: (1) every part of micro-batch p runs in layer order, and each waits for the one
before it (main stream order, or an event across streams), so p's numbers are those of the
unsplit layer on p's rows; (2) the micro-batches share nothing written: their rows of
hidden/residual are disjoint, their KV slots are disjoint, and the attention kernel's
workspace is used by the side stream only, one launch after another; (3) a tensor handed to
the other stream (q, k, v to the side; the attention output back) stays referenced until the
main stream has waited for the attention that read or wrote it, so the caching allocator
cannot hand its memory to a later launch that could run first. With ``SequentialStreams``
(one stream) the same order runs one part after another: the host tests' path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class MicroBatch:
    rows: slice  # this micro-batch's rows of the step (token rows = sequences: pure decode)
    metadata: Any  # the attention kernel's metadata for exactly these rows


class MicroBatches:
    """What a model's forward receives in place of the attention metadata when the step is
    split; ``run_layers`` replaces its loop over the decoder layers."""

    def __init__(self, parts: list[MicroBatch], streams, gemm_scope=None):
        if len(parts) < 2:
            raise ValueError("A split step has at least two micro-batches.")
        self.parts = parts
        self.streams = streams  # OverlapStreams (backends/spec.py)
        # () -> context manager held while the layers are queued (the GEMMs' SM carve-out,
        # ``OverlapStreams.gemm_sm_carveout``); None: nothing
        self.gemm_scope = gemm_scope

    def run_layers(self, layers, positions: torch.Tensor, hidden: torch.Tensor,
                   residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, residual)`` after ``layers`` (``DecoderLayer``s, in order), as the plain
        loop ``hidden, residual = layer(positions, hidden, residual, metadata)`` gives."""
        layers = list(layers)
        parts = range(len(self.parts))
        pos = [positions[p.rows] for p in self.parts]
        hs = [hidden[p.rows] for p in self.parts]
        rs = [None if residual is None else residual[p.rows] for p in self.parts]
        # per micro-batch, its attention in flight: (output, event, tensors it reads)
        flight: list[Optional[tuple]] = [None] * len(self.parts)

        def launch(p: int, layer) -> None:
            hidden_p, rs[p] = layer.input_norm(hs[p], rs[p])
            q, k, v = layer.self_attn.project(pos[p], hidden_p)
            ready = self.streams.record()
            with self.streams.side(ready):
                out = layer.self_attn.attend(pos[p], q, k, v, self.parts[p].metadata)
                done = self.streams.record()
            flight[p] = (out, done, (q, k, v))

        def finish(p: int, layer) -> None:
            out, done, _ = flight[p]
            self.streams.wait(done)
            flight[p] = None  # q, k, v: free now that the main stream waited for their reader
            hs[p], rs[p] = layer.after_attention(layer.self_attn.o_proj(out), rs[p])

        with self.gemm_scope() if self.gemm_scope is not None else contextlib.nullcontext():
            for p in parts:
                launch(p, layers[0])
            for i, layer in enumerate(layers):
                for p in parts:
                    finish(p, layer)
                    if i + 1 < len(layers):
                        launch(p, layers[i + 1])
        return torch.cat(hs), torch.cat(rs)
