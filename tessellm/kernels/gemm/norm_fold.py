"""The residual-add RMSNorm between two one-row GEMVs, split between them so that it puts no
work in either one's weight loop (batch-1 decode, ``TESSELLM_NORM_FOLD2``; on by default for
dense 16-bit weights on cuda, ``models.decoder.norm_fold2_on``).

At batch 1 the decoder runs ``o_proj`` (``down_proj``) as a one-row GEMV, then
``fused_add_rms_norm`` (one program: ~2 us a launch, the dependent-launch hop and the L2 round
trips, not work), then ``gate_up_proj`` (the next layer's ``qkv_proj``) as a one-row GEMV. Two
earlier folds lost (benchmarks/README.md): every program of the next GEMV re-forming the norm
inside its K loop (``gemv_norm.py``: 135 against 65 instructions a weight step), and the
previous GEMV's last program normalizing the whole row after all the others
(``norm_epilogue.py``: a serial tail on every token). Here each GEMV does only what its own
outputs or its own epilogue need::

    producer (o / down), program p, outputs n in its slice (FOLD_OUT):
        h[n]   = round(round(y[n]) + residual[n])     stored in place: the new residual
        xg[n]  = round(h[n] * g[n])                   stored: the consumer's x (no y stored)
        part[p] = sum_n h[n]^2  (float32)             one float a program
    consumer (qkv / gate_up), every program, after its K loop (FOLD_IN):
        rstd = 1 / sqrt(sum_p part[p] / K + eps)      the same bits in every program
        y    = (sum_k W[n, k] xg[k]) * rstd  (then scale, bias, SiLU-and-mul as before)

The consumer's K loop is the plain GEMV's (it reads ``xg`` as it read the normed row); its
epilogue reads the partial sums (``cdiv(N, BLOCK_N)`` floats, 8 KB at Llama-8B's o / down
tiles, from L1 after the first program on an SM) and multiplies one float a tile row. The
producer's epilogue stores 2 values and reads 2 a row it owns. No counter, no atomics, no
serial tail; the norm's own launch is gone.

Numerics: not bitwise the unfused pair. Unfused, the consumer reads ``round(g *
round(h * rstd))``; here ``round(h * g)`` with rstd applied to the float32 sum (one rounding of
the activation instead of two; the norm weight is not folded into the consumer's weights, so
fp8 weights are not re-quantized). In float32 both agree to a few ulps. The sum of squares is
a sum of per-program partials (not the norm kernel's ``pairwise_sum`` order), fixed for a given
launch shape, so every call gives the same bits.

The partials buffer is ``FOLD_PARTS = next_power_of_2(programs)`` floats; the producer's
program 0 also zeroes the tail past its grid, so the consumer sums a whole power-of-two tile
with no mask and no memset launch. ``NORM_EPI`` in the GEMV kernels selects the epilogue:
``NORM_LAST`` (``norm_epilogue.py``), ``FOLD_OUT`` or ``FOLD_IN`` (here), 0 none.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

# ``NORM_EPI`` of the GEMV kernels (constexprs, so the kernels can compare against them)
NORM_LAST = tl.constexpr(1)  # norm_epilogue.py: the last program normalizes the row
FOLD_OUT = tl.constexpr(2)  # the producer's epilogue (o / down): h, xg, a partial sum of squares
FOLD_IN = tl.constexpr(3)  # the consumer's epilogue (qkv / gate_up): the sums times rstd


@triton.jit
def fold_out_weight(rn, N, g_ptr):
    """FOLD_OUT: the norm weight at a producer program's columns ``rn`` (float32). A weight of
    the step (no kernel of a step writes it), so it may be read before the PDL wait."""
    return tl.load(g_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)


@triton.jit
def fold_out_residual(rn, N, res_ptr):
    """FOLD_OUT: the residual at a producer program's columns ``rn`` (float32), read after the
    PDL wait and before the K loop, so its latency hides under the weight reads."""
    return tl.load(res_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)


@triton.jit
def fold_out(y, r, g, rn, N, pid_n, out_ptr, res_ptr, part_ptr, PARTS: tl.constexpr):
    """FOLD_OUT: a producer program's outputs ``y`` [BLOCK_N] (float32, scaled and biased,
    unrounded) at columns ``rn`` (those >= N not stored), with the residual ``r`` and norm
    weight ``g`` there (``fold_out_residual``, ``fold_out_weight``): the new residual in place
    at ``res_ptr``, ``round(h * g)`` at ``out_ptr``, its sum of ``h^2`` at ``part_ptr[pid_n]``;
    program 0 zeroes ``part_ptr[programs:PARTS]``."""
    mask = rn < N
    yr = y.to(out_ptr.dtype.element_ty).to(tl.float32)  # as the plain GEMV stores it
    h = (yr + r).to(res_ptr.dtype.element_ty)
    tl.store(res_ptr + rn, h, mask=mask)
    hf = tl.where(mask, h.to(tl.float32), 0.0)
    tl.store(out_ptr + rn, (hf * g).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + pid_n, tl.sum(hf * hf, 0))
    if pid_n == 0:
        tail = tl.arange(0, PARTS)
        tl.store(part_ptr + tail, tl.zeros([PARTS], dtype=tl.float32),
                 mask=tail >= tl.num_programs(0))


@triton.jit
def fold_rstd(part_ptr, K, eps, PARTS: tl.constexpr):
    """FOLD_IN: ``1 / sqrt(sum(part) / K + eps)`` from the producer's ``PARTS`` partial sums
    (zeros past its grid), the same bits in every program of the launch, chunk by chunk."""
    CHUNK: tl.constexpr = 512 if PARTS > 512 else PARTS  # 4 floats a thread at 4 warps
    acc = tl.load(part_ptr + tl.arange(0, CHUNK))
    for c in tl.static_range(1, PARTS // CHUNK):  # a few registers, whatever the count
        acc += tl.load(part_ptr + c * CHUNK + tl.arange(0, CHUNK))
    return 1.0 / tl.sqrt(tl.sum(acc, 0) / K + eps)  # one block reduction


def fold_applies(x: torch.Tensor, n: int, residual: torch.Tensor,
                 norm_weight: torch.Tensor) -> bool:
    """Whether a one-row GEMV of ``n`` outputs on ``x`` can run the producer's half: one 16-bit
    row, the residual one contiguous row of x's dtype and width ``n`` on x's device, the norm
    weight ``[n]`` contiguous."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and residual.dtype == x.dtype and residual.dim() == 2 and residual.shape[0] == 1
            and residual.shape[1] == n and residual.is_contiguous()
            and residual.device == x.device and norm_weight.dim() == 1
            and norm_weight.shape[0] == n and norm_weight.is_contiguous())


def consume_applies(x: torch.Tensor, sumsq: torch.Tensor) -> bool:
    """Whether a one-row GEMV on ``x`` can take a ``NormFold``'s partial sums in its epilogue
    (``fold_rstd`` sums a power-of-two tile of them)."""
    p = sumsq.numel()
    return (x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and sumsq.dtype == torch.float32 and sumsq.dim() == 1 and sumsq.is_contiguous()
            and p > 0 and p & (p - 1) == 0 and p <= 16384 and sumsq.device == x.device)


def producer_args(programs: int, out: torch.Tensor, residual: torch.Tensor,
                  norm_weight: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The kernels' norm arguments for FOLD_OUT over ``programs`` programs (one K range each)
    and the partials buffer they fill. ``out``: the ``xg`` row."""
    parts = triton.next_power_of_2(programs)
    sumsq = torch.empty(parts, dtype=torch.float32, device=out.device)
    return dict(res_ptr=residual, g_ptr=norm_weight, normed_ptr=out, counter_ptr=sumsq,
                eps=0.0, NORM_EPI=FOLD_OUT.value, NORM_BLOCK=parts), sumsq


def consumer_args(sumsq: torch.Tensor, eps: float, dummy: torch.Tensor) -> dict:
    """The kernels' norm arguments for FOLD_IN on a ``NormFold``'s ``sumsq``."""
    return dict(res_ptr=dummy, g_ptr=dummy, normed_ptr=dummy, counter_ptr=sumsq,
                eps=float(eps), NORM_EPI=FOLD_IN.value,
                NORM_BLOCK=sumsq.numel())


def fold_reference(y: torch.Tensor, residual: torch.Tensor,
                   norm_weight: torch.Tensor) -> tuple:
    """The producer's half on a finished product ``y [1, N]`` in torch (the fallback where no
    GEMV takes it): ``(round(h * g), sumsq [1], h)``, h stored into the residual where it can
    be."""
    h = (y.to(residual.dtype).float() + residual.float()).to(residual.dtype)
    if residual.is_contiguous() and residual.shape == h.shape:
        residual.copy_(h)
        h = residual
    hf = h.float()
    return (hf * norm_weight.float()).to(y.dtype), (hf * hf).sum().reshape(1), h


def rms_scaled_reference(y: torch.Tensor, sumsq: torch.Tensor, k: int, eps: float,
                         bias=None) -> torch.Tensor:
    """The consumer's half on a product ``y`` (float32) in torch: ``y * rstd (+ bias)``."""
    y = y.float() * torch.rsqrt(sumsq.float().sum() / k + eps)
    return y if bias is None else y + bias.float()
