"""Structured output's token mask on the logits, in place, the whole batch in one launch.

Layout (xgrammar's): the mask of one row is int32 words; bit ``t % 32`` of word ``t // 32`` is 1
when token ``t`` is allowed::

    logits row r    [ l0  l1 ... l31 | l32 ... l63 | ... ]          (vocab V)
    bitmask row i   [   word 0       |   word 1    | ... ]          (ceil(V / 32) int32)
    r = indices[i]  (or i without indices)

Grid: (mask rows, cdiv(V, BLOCK)). Each program reads the words of its BLOCK tokens, tests each
token's bit and stores -inf over the disallowed logits; allowed logits are never written, so
they stay bit-exact. Tensors in, tensors out: imports neither tessellm.core nor backends.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _apply_bitmask_kernel(logits_ptr, bitmask_ptr, indices_ptr, vocab, logits_stride, bitmask_stride,
                          HAS_INDICES: tl.constexpr, BLOCK: tl.constexpr):
    mask_row = tl.program_id(0)
    if HAS_INDICES:
        logits_row = tl.load(indices_ptr + mask_row).to(tl.int64)
    else:
        logits_row = mask_row.to(tl.int64)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab
    words = tl.load(bitmask_ptr + mask_row.to(tl.int64) * bitmask_stride + tokens // 32,
                    mask=in_vocab, other=-1)
    allowed = ((words >> (tokens % 32)) & 1) != 0
    neg_inf = tl.full([BLOCK], float("-inf"), logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + logits_row * logits_stride + tokens, neg_inf, mask=in_vocab & ~allowed)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        indices: Optional[torch.Tensor] = None) -> None:
    """``logits[indices[i], t] = -inf`` where bit t of ``bitmask[i]`` is 0 (``indices`` None:
    row i). ``logits`` float ``[R, V]`` with a contiguous last dim; ``bitmask`` int32
    ``[M, >= ceil(V / 32)]`` on the same device."""
    vocab = logits.shape[-1]
    if bitmask.dtype != torch.int32 or bitmask.shape[-1] * 32 < vocab:
        raise ValueError(f"bitmask must be int32 with >= {(vocab + 31) // 32} words per row, got "
                         f"{bitmask.dtype} {tuple(bitmask.shape)}.")
    if logits.stride(-1) != 1 or bitmask.stride(-1) != 1:
        raise ValueError("apply_token_bitmask needs logits and bitmask contiguous in the last dim.")
    rows = bitmask.shape[0]
    if rows == 0:
        return
    has_indices = indices is not None
    idx = indices if has_indices else bitmask  # any pointer: unused without indices
    grid = (rows, triton.cdiv(vocab, _BLOCK))
    _apply_bitmask_kernel[grid](logits, bitmask, idx, vocab, logits.stride(0), bitmask.stride(0),
                                HAS_INDICES=has_indices, BLOCK=_BLOCK)


class TritonLogitsOps:
    """The ``LogitsOps`` (backends/spec.py) of any backend that runs Triton (cuda, rocm)."""

    name = "triton"

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor,
                            indices: Optional[torch.Tensor] = None) -> None:
        apply_token_bitmask(logits, bitmask, indices)

    def argmax(self, x: torch.Tensor, divisor: Optional[torch.Tensor] = None) -> torch.Tensor:
        from tessellm.kernels import sampling

        if x.dim() != 2 or x.stride(-1) != 1 or (divisor is not None and divisor.stride(-1) != 1):
            return (x if divisor is None else x / divisor).argmax(dim=-1)
        return sampling.argmax(x, divisor)
