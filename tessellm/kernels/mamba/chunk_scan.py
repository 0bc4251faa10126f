"""The Mamba2 chunked SSD scan of prefill chunks in Triton (``FusedOps.mamba_chunk_scan``; the
oracle is ``backends/reference/mamba.ssd_chunk_scan``).

``mamba_chunk_scan`` runs the parallel SSD kernels of ``ssd.py`` (parallel over chunks, heads
and tiles) by default (``envs.ssd_scan``; 2.0-7.6x the sequential kernel on an H100 at 512-8000
tokens), the sequential kernel with ``TESSELLM_SSD_SCAN=0``, for steps whose longest sequence
is short (``SSD_MIN_TOKENS``: one launch beats five there) and where their scratch would not
fit: the sequential kernel keeps the state in registers and needs no memory beyond ``y``, but
walks each sequence's tokens in order (one program per sequence and head: ~1.3 us a token on an H100, 2 ms a layer for a
1500-token chunk).

The sequential kernel: one program per (sequence, head, block of head dims) walks its sequence a
chunk of ``Q`` tokens at a time, carrying that block of the state ``h [BLOCK_P, N]`` in
registers from the slot's initial state to the final one, which it writes back. Per chunk, with
``a = cumsum(dt * A)`` over its tokens (a token past the sequence's end has ``dt = 0``: no
decay, no input)::

    y   = ((C B^T) * [s <= l] exp(a_l - a_s)) @ (dt x)  +  exp(a_l) * (C @ h^T)  +  D x
    h   = exp(a_Q) h  +  (dt x * exp(a_Q - a_s))^T @ B

``Q`` (32) is the kernel's own (16 or more, for ``tl.dot``); the model's ``chunk_size`` only
fixes where the reference cuts, and the result is the same function of the inputs. Products
are float32 (``tf32x3`` on tensor cores: float32-level accuracy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm import envs
from tessellm.kernels.host_ints import cdiv, next_power_of_2
from tessellm.kernels.launch import FastLaunch
from tessellm.kernels.mamba import ssd
from tessellm.kernels.recurrent_pieces import save_pointers
from tessellm.kernels.recurrent_saves import chunk_end, keep_state


@triton.jit
def _scan_chunk(x_ptr, dt_ptr, b_ptr, c_ptr, y_ptr, state, start, c0, end, h, g, A, D, bias,
                dt_lo, dt_hi, ps, ns, ls, pm, nm, causal, sx_t, sx_h, sdt_t, sb_t, sb_g, sc_t,
                sc_g, sy_t, sy_h, CLAMP: tl.constexpr):
    """Tokens ``c0 .. end - 1`` (at most ``Q``) of a sequence: stores their ``y`` and returns
    the state after them."""
    rows = c0 + ls
    rm = rows < end
    tok = start + rows
    dt = tl.load(dt_ptr + tok * sdt_t + h, mask=rm, other=0.0).to(tl.float32) + bias
    dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    dt = tl.where(rm, dt, 0.0)
    a = tl.cumsum(dt * A, axis=0)  # [Q]
    a_end = tl.sum(dt * A, axis=0)
    x = tl.load(x_ptr + tok[:, None] * sx_t + h * sx_h + ps[None, :],
                mask=rm[:, None] & pm[None, :], other=0.0).to(tl.float32)  # [Q, BLOCK_P]
    B = tl.load(b_ptr + tok[:, None] * sb_t + g * sb_g + ns[None, :],
                mask=rm[:, None] & nm[None, :], other=0.0).to(tl.float32)  # [Q, BLOCK_N]
    C = tl.load(c_ptr + tok[:, None] * sc_t + g * sc_g + ns[None, :],
                mask=rm[:, None] & nm[None, :], other=0.0).to(tl.float32)
    xdt = x * dt[:, None]
    decay = tl.where(causal, tl.exp(a[:, None] - a[None, :]), 0.0)
    scores = tl.dot(C, tl.trans(B), input_precision="tf32x3") * decay  # [Q, Q]
    y = tl.dot(scores, xdt, input_precision="tf32x3")
    y += tl.exp(a)[:, None] * tl.dot(C, tl.trans(state), input_precision="tf32x3")
    y += D * x
    tl.store(y_ptr + tok[:, None] * sy_t + h * sy_h + ps[None, :],
             y.to(y_ptr.dtype.element_ty), mask=rm[:, None] & pm[None, :])
    to_end = xdt * tl.exp(a_end - a)[:, None]  # [Q, BLOCK_P]
    return tl.exp(a_end) * state + tl.dot(tl.trans(to_end), B, input_precision="tf32x3")


@triton.jit
def _chunk_scan_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dt_bias_ptr, state_ptr,
                       qsl_ptr, idx_ptr, y_ptr, snap_ptr, save_first_ptr, save_off_ptr,
                       save_slot_ptr, heads_per_group, P, N, dt_lo, dt_hi,
                       sx_t, sx_h, sdt_t, sb_t, sb_g, sc_t, sc_g, ss_slot, ss_h, ss_p, sy_t, sy_h,
                       snap_slot, CLAMP: tl.constexpr, SAVES: tl.constexpr, Q: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(qsl_ptr + s).to(tl.int64)
    length = tl.load(qsl_ptr + s + 1).to(tl.int64) - start
    slot = tl.load(idx_ptr + s).to(tl.int64)
    g = h // heads_per_group
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    ls = tl.arange(0, Q)
    pm, nm = ps < P, ns < N
    A = tl.load(a_ptr + h).to(tl.float32)
    D = tl.load(d_ptr + h).to(tl.float32)
    bias = tl.load(dt_bias_ptr + h).to(tl.float32)
    inner = h * ss_h + ps[:, None] * ss_p + ns[None, :]
    sptrs = state_ptr + slot * ss_slot + inner
    smask = pm[:, None] & nm[None, :]
    state = tl.load(sptrs, mask=smask, other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_N]
    causal = ls[:, None] >= ls[None, :]
    if SAVES:
        # the sequence's saves k .. k_end - 1 (offsets ascending, within 0 .. length): a chunk
        # ends at the next one, whose state is then stored into its snapshot slot, and the
        # next chunk starts there (the chunks of the scan run once per piece between them)
        # (``kernels/recurrent_saves.py``, shared with the gated delta chunk kernel)
        k = tl.load(save_first_ptr + s)
        k_end = tl.load(save_first_ptr + s + 1)
        c0 = start * 0
        while (c0 < length) | (k < k_end):
            end, cut = chunk_end(c0, length, k, k_end, save_off_ptr, Q)
            state = _scan_chunk(x_ptr, dt_ptr, b_ptr, c_ptr, y_ptr, state, start, c0, end, h, g,
                                A, D, bias, dt_lo, dt_hi, ps, ns, ls, pm, nm, causal, sx_t,
                                sx_h, sdt_t, sb_t, sb_g, sc_t, sc_g, sy_t, sy_h, CLAMP)
            k = keep_state(state, end, cut, k, k_end, save_slot_ptr, snap_ptr, snap_slot, inner,
                           smask)
            c0 = end
    else:
        for c0 in range(0, length, Q):
            state = _scan_chunk(x_ptr, dt_ptr, b_ptr, c_ptr, y_ptr, state, start, c0, length, h,
                                g, A, D, bias, dt_lo, dt_hi, ps, ns, ls, pm, nm, causal, sx_t,
                                sx_h, sdt_t, sb_t, sb_g, sc_t, sc_g, sy_t, sy_h, CLAMP)
    tl.store(sptrs, state.to(state_ptr.dtype.element_ty), mask=smask)


_scan_launch = FastLaunch(_chunk_scan_kernel)  # (kernels/launch.py: no per-call binding on a hit)

# The SSD kernels' float32 chunk states ([chunks, H, P, N]) beyond this: the sequential kernel
# (a 16k-token chunk of 128 heads of 64 x 128 is 1 GiB; serving steps stay far below).
SSD_SCRATCH_LIMIT = 1 << 30

# Steps whose longest sequence is shorter than this run the sequential kernel even with the
# SSD kernels on: the SSD kernels cost five launches (and four scratch allocations) a
# layer however few the tokens, and below one SSD chunk (128) a sequence has no chunks to run in
# parallel, while the sequential kernel is one launch whose time grows with the longest
# sequence (~1.3 us a token on an H100: 2.0 ms a layer for 1500 tokens, session 18). Cached
# prefix steps (a block's tail plus a short suffix) and decode-sized mixed steps fall below it.
# Measured on an H100 (session 19, benchmarks/hybfast_device.sh, bench_ssd_scan.py --lengths,
# Mamba2-2.7B and Granite 4.0-H small heads, bf16): sequential 0.096-0.104 ms against SSD's
# 0.128-0.133 at 128 tokens, 0.182-0.196 against 0.130-0.131 at 256 (the SSD's five launches
# cost ~0.13 ms up to ~1k tokens, the sequential kernel ~0.7 us a token): they cross near 180.
SSD_MIN_TOKENS = 192


def use_ssd(batch, H: int, P: int, N: int) -> bool:
    """Whether ``mamba_chunk_scan`` runs the SSD kernels for ``batch`` (its prefill sequences):
    not turned off (``TESSELLM_SSD_SCAN=0``), the longest sequence at least ``SSD_MIN_TOKENS``
    and the SSD's chunk states within ``SSD_SCRATCH_LIMIT``. Decided once a step (the
    environment read, the lengths walked), kept on the batch for its other layers."""
    qsl = batch.query_start_loc_host
    key = (H, P, N, *qsl)  # (a batch object reused with other lengths: decided again)
    made = getattr(batch, "_use_ssd", None)
    if made is not None and made[0] == key:  # every layer of a step: decided by the first
        return made[1]
    use = envs.ssd_scan()
    if use:
        longest = max(hi - lo for lo, hi in zip(qsl[:-1], qsl[1:]))
        chunks = (qsl[-1] + (len(qsl) - 1) * (ssd.CHUNK - 1)) // ssd.CHUNK  # at most
        use = longest >= SSD_MIN_TOKENS and chunks * H * P * N * 4 <= SSD_SCRATCH_LIMIT
    batch._use_ssd = (key, use)
    return use


def mamba_chunk_scan(x, dt, A, B, C, D, dt_bias, ssm_state, batch, chunk_size: int,
                     dt_limit=(0.0, float("inf")), snapshots=None) -> torch.Tensor:
    """``x [T, H, P]``, ``dt [T, H]``, ``B, C [T, G, N]``, ``ssm_state [slots, H, P, N]``
    (contiguous); ``batch`` a ``MambaBatch``. Returns ``y [T, H, P]``. ``snapshots``: the
    pool ``batch.state_saves`` name slots of (``FusedOps.mamba_state_saves``): the SSD
    kernels keep them in their one pass (their chunks start at each offset), and so does the
    sequential kernel (``sequential_chunk_scan``)."""
    T, H, P = x.shape
    N = ssm_state.shape[-1]
    if T == 0 or not batch.state_indices_host:
        return torch.empty_like(x)
    x, dt, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dt, B, C))
    if not ssm_state.is_contiguous():
        raise ValueError("mamba_chunk_scan needs a contiguous ssm_state.")
    if use_ssd(batch, H, P, N):
        return ssd.ssd_chunk_scan(x, dt, A, B, C, D, dt_bias, ssm_state, batch, dt_limit,
                                  snapshots=snapshots)
    return sequential_chunk_scan(x, dt, A, B, C, D, dt_bias, ssm_state, batch, dt_limit,
                                 snapshots=snapshots)


def sequential_chunk_scan(x, dt, A, B, C, D, dt_bias, ssm_state, batch,
                          dt_limit=(0.0, float("inf")), snapshots=None) -> torch.Tensor:
    """The sequential kernel (arguments as ``mamba_chunk_scan``). With ``snapshots`` and
    ``batch.state_saves`` it keeps the states at the saves' offsets in its one pass: a chunk
    ends at each, its state is stored into the snapshot slot, and the next chunk starts there
    (the chunks of one call per piece between them: the same outputs and states)."""
    T, H, P = x.shape
    N = ssm_state.shape[-1]
    y = torch.empty_like(x)
    seqs = len(batch.state_indices_host)
    if T == 0 or seqs == 0:
        return y
    x, dt, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dt, B, C))
    if not ssm_state.is_contiguous():
        raise ValueError("mamba_chunk_scan needs a contiguous ssm_state.")
    saves = getattr(batch, "state_saves", None)
    snap, first, offs, pslots = save_pointers(batch, snapshots, ssm_state, "mamba_chunk_scan")
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    block_p, warps = sequential_config(P, N)
    _scan_launch(
        (seqs, H, cdiv(P, block_p)),
        (x, dt, A, B, C, D, dt_bias, ssm_state, batch.query_start_loc, batch.state_indices, y,
         snap, first, offs, pslots),
        (H // B.shape[1], P, N, lo, hi if hi != float("inf") else 3.0e38, x.stride(0),
         x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
         ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0), y.stride(1),
         snap.stride(0)),
        {"CLAMP": lo > 0.0 or hi != float("inf"), "SAVES": bool(saves), "Q": 32,
         "BLOCK_P": block_p, "BLOCK_N": max(16, next_power_of_2(N)), "num_warps": warps})
    return y


def sequential_config(P: int, N: int) -> tuple[int, int]:
    """The sequential kernel's head dims a program and warps for head dim ``P``, state ``N``.
    The state block [BLOCK_P, N] lives in registers: fewer head dims a program for large N.
    On an H100 at P = 64, N = 128 (Mamba2-2.7B, Granite 4.0-H), BLOCK_P 16 at 4 warps took
    0.091-0.098 / 1.22 ms for 128 / 2048 tokens against 0.112-0.125 / 1.52-1.67 for 64, the
    earlier default (``benchmarks/kernels/bench_seq_tiles.py``, benchmarks/README.md session 22);
    smaller states are untimed and keep the wider block."""
    return max(16, min(next_power_of_2(P), 16 if N >= 128 else 64)), 4
