"""The residual-add RMSNorm after a one-row GEMV, run by the GEMV's last program (batch-1
decode, ``TESSELLM_GEMV_NORM_EPILOGUE``; off by default: correct but slower on an H100,
B1 fp8 +19% / bf16 +9%, benchmarks/README.md session 19).

At batch 1 the decoder runs ``o_proj`` (or ``down_proj``) as a one-row GEMV and then
``fused_add_rms_norm`` on its output: a launch of one program that reads 8 KB, reduces and
writes 16 KB, ~2 us a launch on the chain (two a layer, 0.125 ms a token on an H200), almost
all of it the dependent-launch hop and the L2 round trips, not work. Here the GEMV does it: every
program stores its outputs as before, then (after a CTA barrier) takes an int32 counter with one
gpu-scope acq_rel add; the program that takes it to the grid's size resets it and, its acquire
having made every other program's stores visible, reads the whole output row back past L1
(``.cg``), adds the residual, stores the new residual in place, normalizes and stores the normed
row. The same semaphore pattern as the decode attention's last-split reduce
(``attention/decode.py``). One launch a norm fewer, bitwise the GEMV followed by
``norm._rms_norm_kernel``: the output row is read back as the GEMV rounded it, and the norm is
that kernel's arithmetic (``pairwise_sum`` of squares, the same roundings) with the squares as
``mul.rn.f32`` (never contracted into the sum's adds, as ``NORM_LAUNCH_OPTIONS`` ensures there;
the GEMV kernels keep their own FMA contraction). Only where one program covers all of K (no
split-K planes) and the row has at most ``NORM_EPILOGUE_MAX_N`` outputs.

Not the wave-2g fold that lost (``gemv_norm.py``: every program of the *next* GEMV re-formed the
norm from x and the residual inside its K loop): here the norm is formed once, by one program,
after the GEMV's last weight read, and the next GEMV reads a finished row as before. What it
costs instead: one same-address atomic per program (2,048 for o / down at Llama-3.1-8B shapes)
and the last program's serial tail.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from tessellm.kernels.pairwise_sum import pairwise_sum

NORM_EPILOGUE_MAX_N = 16384  # outputs the last program normalizes (chunk by chunk, unrolled)
NORM_CHUNK = tl.constexpr(512)  # values of the row a chunk: 4 a thread at 4 warps


class NormEpilogue(NamedTuple):
    """What the GEMV's last program needs: the residual row (updated in place), the norm's
    weight and epsilon, the normed row's buffer and the launch's counter (int32, zero)."""

    residual: torch.Tensor
    weight: torch.Tensor
    eps: float
    normed: torch.Tensor
    counter: torch.Tensor


@triton.jit
def _square_rn(x, PTX: tl.constexpr):
    """x * x rounded on its own (``mul.rn.f32``: never contracted into a following add)."""
    if PTX:
        sq = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $1;", "=f,f", [x], dtype=tl.float32,
                                       is_pure=True, pack=1)
    else:
        sq = x * x
    return sq


@triton.jit
def norm_epilogue(y_ptr, res_ptr, g_ptr, normed_ptr, counter_ptr, N, eps,
                  NORM_BLOCK: tl.constexpr, PTX: tl.constexpr):
    """Called by every program of a one-row GEMV after its last store of ``y`` (its own
    outputs); the last program to arrive runs the residual-add RMSNorm of the whole row
    ``y[0:N]``: ``res = round(y + res)`` (stored in place), ``normed = round(g *
    round(res * rstd))``, as ``norm.add_rms_norm_row``. The grid is one-dimensional along N
    (axis 1 of size 1). The row goes in chunks of ``NORM_CHUNK`` (a few values a thread: the
    GEMV's register budget, and so its programs an SM, stays that of its K loop), twice: the
    sum of squares, then the stores (the sums re-formed from y and the residual, which the
    first pass leaves unchanged). The sum is ``pairwise_sum``'s tree over the whole row: each
    chunk's subtree, then the tree of the chunks' sums, the same additions in the same order."""
    # Every thread's stores come before the counter's release (the barrier); the program that
    # takes the count to the grid size reads them all after its acquire.
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")  # for the next launch
        CHUNK: tl.constexpr = NORM_CHUNK if NORM_CHUNK < NORM_BLOCK else NORM_BLOCK
        NUM_CHUNKS: tl.constexpr = NORM_BLOCK // CHUNK
        dt = res_ptr.dtype.element_ty
        part = tl.arange(0, NUM_CHUNKS)
        sums = tl.zeros([NUM_CHUNKS], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            hf = _residual_sum(y_ptr, res_ptr, c * CHUNK + tl.arange(0, CHUNK), N, dt)
            sums = tl.where(part == c, pairwise_sum(_square_rn(hf, PTX)), sums)
        rstd = 1.0 / tl.sqrt(pairwise_sum(sums) / N + eps)
        for c in range(NUM_CHUNKS):
            cols = c * CHUNK + tl.arange(0, CHUNK)
            mask = cols < N
            hf = _residual_sum(y_ptr, res_ptr, cols, N, dt)
            tl.store(res_ptr + cols, hf.to(dt), mask=mask)
            xn = (hf * rstd).to(dt).to(tl.float32)
            w = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(normed_ptr + cols, (w * xn).to(normed_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_sum(y_ptr, res_ptr, cols, N, dt: tl.constexpr):
    """``round_dt(y + res)`` at ``cols`` as float32 (0 past N); y read past L1 (``.cg``: the
    other programs stored it)."""
    mask = cols < N
    y = tl.load(y_ptr + cols, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    r = tl.load(res_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return (y + r).to(dt).to(tl.float32)


_COUNTERS: dict = {}


def _counter(device: torch.device, key: int) -> torch.Tensor:
    """The int32 counter of the GEMV over weight ``key`` (its data pointer) on ``device``: zero,
    and left zero by every launch (its last program resets it). One per weight, so launches on
    different streams never share one; made once, outside any graph capture in the engine (the
    warm-up runs each shape eagerly first)."""
    k = (device.index, key)
    ctr = _COUNTERS.get(k)
    if ctr is None:
        ctr = _COUNTERS[k] = torch.zeros(1, dtype=torch.int32, device=device)
    return ctr


def norm_epilogue_applies(x: torch.Tensor, n: int, residual: torch.Tensor,
                          norm_weight: torch.Tensor) -> bool:
    """Whether a one-row GEMV of ``n`` outputs on ``x`` can run the add-RMSNorm in its epilogue:
    one row, a 16-bit x, the residual one contiguous row of x's dtype and width ``n``, the norm
    weight ``[n]``, and ``n`` at most ``NORM_EPILOGUE_MAX_N``."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and residual.dtype == x.dtype and residual.dim() == 2 and residual.shape[0] == 1
            and residual.shape[1] == n and residual.is_contiguous()
            and norm_weight.dim() == 1 and norm_weight.shape[0] == n
            and norm_weight.is_contiguous() and n <= NORM_EPILOGUE_MAX_N
            and residual.device == x.device)


def make_epilogue(x: torch.Tensor, weight_key: int, n: int, residual: torch.Tensor,
                  norm_weight: torch.Tensor, eps: float) -> NormEpilogue:
    """The ``NormEpilogue`` of one launch (``norm_epilogue_applies`` holds)."""
    normed = torch.empty(1, n, dtype=torch.promote_types(norm_weight.dtype, residual.dtype),
                         device=x.device)
    return NormEpilogue(residual, norm_weight, float(eps), normed,
                        _counter(x.device, weight_key))


def epilogue_args(norm: Optional[NormEpilogue], dummy: torch.Tensor) -> dict:
    """The kernels' norm arguments: ``NORM_EPI`` off with placeholders where ``norm`` is None."""
    if norm is None:
        return dict(res_ptr=dummy, g_ptr=dummy, normed_ptr=dummy, counter_ptr=dummy, eps=0.0,
                    NORM_EPI=0, NORM_BLOCK=1)
    return dict(res_ptr=norm.residual, g_ptr=norm.weight, normed_ptr=norm.normed,
                counter_ptr=norm.counter, eps=norm.eps, NORM_EPI=1,
                NORM_BLOCK=triton.next_power_of_2(norm.residual.shape[1]))
