"""The sampler's reductions over the vocabulary: argmax of each logits row, optionally of the row
divided elementwise by another tensor (the exponential race ``argmax(p / q)``, ``q ~ Exp(1)``,
that samples from ``p`` without a host sync), in two launches.

Why: a row of 128k logits is one reduction; ``torch.argmax`` on a single row keeps few CTAs
busy (27-37 us a decode step at batch 1 on an H100/H200). Here stage 1 splits every row into
``BLOCK``-wide chunks, one program each, and writes each chunk's maximum and its first index;
stage 2 reduces a row's chunk results. Ties go to the lowest index, as ``torch.argmax`` does
(each chunk keeps its first maximum; stage 2 keeps the first chunk holding the row maximum).
Values compare in float32 (exact for bfloat16/float16 inputs). NaN is not handled specially.

Tensors in, tensors out: imports neither tessellm.core nor backends.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_BLOCK = 4096


@triton.jit
def _chunk_argmax_kernel(x_ptr, div_ptr, part_val_ptr, part_idx_ptr, vocab, x_stride, div_stride,
                         num_chunks, HAS_DIV: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = cols < vocab
    x = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=float("-inf")).to(tl.float32)
    if HAS_DIV:
        d = tl.load(div_ptr + row * div_stride + cols, mask=ok, other=1.0).to(tl.float32)
        x = tl.where(ok, x / d, float("-inf"))
    best, where = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(part_val_ptr + row * num_chunks + chunk, best)
    tl.store(part_idx_ptr + row * num_chunks + chunk, chunk * BLOCK + where)


@triton.jit
def _row_argmax_kernel(part_val_ptr, part_idx_ptr, out_ptr, num_chunks, CHUNKS_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS_P2)
    vals = tl.load(part_val_ptr + row * num_chunks + c, mask=c < num_chunks, other=float("-inf"))
    _, first = tl.max(vals, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.load(part_idx_ptr + row * num_chunks + first).to(tl.int64))


def argmax(x: torch.Tensor, divisor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(x / divisor).argmax(-1)`` (or ``x.argmax(-1)``) for a 2-D ``x`` with unit column
    stride: int64 ``[rows]`` on ``x``'s device."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("argmax wants a 2-D tensor with contiguous rows.")
    rows, vocab = x.shape
    if divisor is not None and (divisor.shape != x.shape or divisor.stride(-1) != 1):
        raise ValueError("argmax's divisor must have the input's shape and contiguous rows.")
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    num_chunks = triton.cdiv(vocab, _BLOCK)
    part_val = torch.empty(rows, num_chunks, dtype=torch.float32, device=x.device)
    part_idx = torch.empty(rows, num_chunks, dtype=torch.int32, device=x.device)
    div = divisor if divisor is not None else x
    _chunk_argmax_kernel[(rows, num_chunks)](x, div, part_val, part_idx, vocab, x.stride(0),
                                             div.stride(0), num_chunks, HAS_DIV=divisor is not None,
                                             BLOCK=_BLOCK, num_warps=8)
    _row_argmax_kernel[(rows,)](part_val, part_idx, out, num_chunks,
                                CHUNKS_P2=triton.next_power_of_2(num_chunks), num_warps=1)
    return out
