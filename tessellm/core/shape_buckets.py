"""Bucketed step shapes for compiling devices (XLA: the tpu backend on torch-xla).

torch-xla traces each step lazily and compiles one XLA program per distinct graph; a graph's
shapes are part of its key, so a step whose token count, sequence count or block-table width
changes would compile again. An attention kernel that declares ``token_bucket(n)`` (and
``seq_bucket(n)``) asks the runner to pad every step to those buckets::

    real step:   T = 37 tokens, S = 5 sequences, R = 5 sampled rows
    padded:      T = token_bucket(37) = 64   rows 37..63: id 0, position 0, slot -1
                 R = seq_bucket(5)    = 8    rows 5..7 repeat the last sampled row
                 S, block table:      the kernel's metadata pads them (xla_attention.py)

so a serving run compiles one program per (T, S, pure decode or not) at most, and warm-up
compiles them all before the engine says ready (``precompile_steps``). The step runs as one
program: the runner cuts the graph after the logits (``backend.synchronize()``, the KV-cache
writes included) and samples on the host, where data-dependent shapes (top-k, penalties,
grammar masks) cost no compilation. Autograd is off with ``torch.no_grad`` there, not
``torch.inference_mode`` (torch-xla's lazy tensors fail under inference mode: "Cannot set
version_counter for inference tensor").
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, Optional

import numpy as np
import torch

from tessellm.backends.reference.padded_attention import pow2  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)


def no_grad_mode(device: torch.device):
    """``torch.no_grad`` on XLA, ``torch.inference_mode`` elsewhere (module doc)."""
    return torch.no_grad() if device.type == "xla" else torch.inference_mode()


def runner_grad_mode(method):
    """Decorate a ModelRunner method: autograd off the right way for its device."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with no_grad_mode(self.device):
            return method(self, *args, **kwargs)
    return wrapper


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The kernel's bucket functions (``token_bucket`` for T, ``seq_bucket`` for S and R)."""

    token: Callable[[int], int]
    seq: Callable[[int], int]

    @classmethod
    def of(cls, kernel) -> Optional["Buckets"]:
        token = getattr(kernel, "token_bucket", None)
        if token is None:
            return None
        return cls(token, getattr(kernel, "seq_bucket", pow2))


def pad_host_inputs(host, buckets: Buckets, num_seqs: int, table_width: int):
    """``host`` (``HostInputs``) with its tokens padded to ``buckets.token``, its sampled rows
    to ``buckets.seq`` of the larger of the sequence and row counts (rows >= 1 always: a step
    that samples nothing computes the logits of row 0 anyway, so it is the same program) and
    its block table to ``table_width`` columns (the widest a sequence can need)."""
    t = host.num_tokens
    size = buckets.token(t)
    rows = host.logits_indices
    num_rows = buckets.seq(max(num_seqs, rows.shape[0]))

    def padded(array: np.ndarray, value: int) -> np.ndarray:  # along the last (token) axis
        out = np.full((*array.shape[:-1], size), value, dtype=array.dtype)
        out[..., :t] = array
        return out

    last = rows[-1] if rows.shape[0] else 0
    logits_rows = np.full(num_rows, last, dtype=np.int64)
    logits_rows[:rows.shape[0]] = rows
    table = np.zeros((host.block_table.shape[0], table_width), dtype=host.block_table.dtype)
    table[:, :host.block_table.shape[1]] = host.block_table
    return dataclasses.replace(host, input_ids=padded(host.input_ids, 0), block_table=table,
                               positions=padded(host.positions, 0),
                               slot_mapping=padded(host.slot_mapping, -1),
                               logits_indices=logits_rows)


def step_shapes(buckets: Buckets, max_num_seqs: int, max_num_tokens: int, max_model_len: int):
    """Every (tokens, per-sequence counts) shape class a step can fall in: a pure-decode step
    per sequence bucket, and a mixed step per (token bucket, sequence bucket); each as the
    ``counts`` of one representative step."""
    seq_sizes = sorted({buckets.seq(n) for n in range(1, max_num_seqs + 1)})
    tok_sizes = sorted({buckets.token(n) for n in range(1, max_num_tokens + 1)})
    shapes = []
    for s in seq_sizes:
        n = min(s, max_num_seqs)
        if n <= max_num_tokens:
            shapes.append([1] * n)  # pure decode
    for t in tok_sizes:
        total = min(t, max_num_tokens)
        for s in seq_sizes:
            n = min(s, max_num_seqs)
            if total <= n or total > n * max_model_len:
                continue  # no mixed step of n sequences has this many tokens
            counts = [total // n + (i < total % n) for i in range(n)]
            if counts == [1] * n:
                continue
            shapes.append(counts)
    return shapes


def precompile_steps(runner) -> dict:
    """One synthetic step per shape class of ``step_shapes`` through ``runner``'s bucketed path,
    driven by its graph runner's ``precompile`` (XLA compiles each program once, before the
    engine says ready). The steps write into block 0 of the cache, which no request has written
    yet. Returns ``{"shapes", "compiled", "seconds"}``."""
    from tessellm.core.block_table import PersistentBlockTable
    from tessellm.core.input_batch import RunnerRequest
    from tessellm.core.input_builder import build_inputs
    from tessellm.core.sampling_params import SamplingParams

    bs, gr, width = runner.block_size, runner.graph_runner, runner.batch.tables.width
    runner.backend.synchronize()  # the cache's zeros are their own program, not the first step's
    shapes = step_shapes(runner.buckets, gr.max_num_seqs, gr.max_num_tokens or runner.max_model_len,
                         runner.max_model_len)

    def step(counts: list[int]) -> None:
        tables = PersistentBlockTable(width, rows=len(counts))
        states = [RunnerRequest(f"precompile-{i}", [0] * n, n, SamplingParams(max_tokens=1),
                                [0] * -(-n // bs), 0, tables.add([0] * -(-n // bs)))
                  for i, n in enumerate(counts)]
        host = build_inputs(states, counts, None, tables, bs, runner.steps.input_token)
        runner._forward_bucketed(host, states, counts, 0)

    gr.precompile(step, shapes)
    return {"shapes": len(gr.shapes), "compiled": gr.compiled, "seconds": gr.seconds}
