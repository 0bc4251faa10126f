"""The Mamba2 causal conv1d with per-request state in Triton (``FusedOps.mamba_conv1d``; the
oracle is ``backends/reference/mamba.causal_conv1d``), for decodes and prefill chunks alike.

Token ``t`` of a sequence (0-based in this step) reads the K inputs ending at it; those before
the step's first token come from the sequence's conv state (the K - 1 inputs before it)::

    window of t:   in[t - K + 1] ... in[t]       in[j] = x[start + j]           j >= 0
                                                 in[j] = conv_state[slot, :, K - 1 + j]   j < 0
    out[t] = silu(sum_k w[:, k] * in[t - K + 1 + k] + bias)

One launch: one program per sequence, block of tokens and block of channels writes its outputs
(every token is independent); the program of a sequence's first block of tokens (at least
K - 1 long: the only one whose taps read the state) then writes the new state, the last K - 1
inputs, read whole, then a barrier, then written, so no output reads a state the step already
overwrote. (Two launches until session 21, outputs then states: a launch of host time a layer
on every eager step.)

States inside the step (``snapshots=``, ``MambaBatch.state_saves``; plugin API 23
``FusedOps.mamba_conv_state_saves``): the conv state after a sequence's first ``offset``
tokens is the window of the K - 1 inputs before token ``offset``, read as the new state is
(from x, older columns from the slot's state where ``offset < K - 1``). The sequence's
first program stores each of its saves' windows into the snapshot slot before its
barrier, so all of a step's conv saves cost no launch of their own (they were a copy per save
and a cat per save inside the window, built on the host per layer)::

    sequence of 10 tokens, K - 1 = 3, saves at offsets 2 and 6 (to pool slots a and b):
    pool[a] <- [state[2], x[0], x[1]]   pool[b] <- [x[3], x[4], x[5]]   state <- [x[7], x[8], x[9]]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.host_ints import cdiv, next_power_of_2
from tessellm.kernels.launch import FastLaunch
from tessellm.kernels.recurrent_pieces import save_pointers


@triton.jit
def _window(x_ptr, state_ptr, start, end, base, ks, cs, km, cm, sx_t, KM1: tl.constexpr):
    """The K - 1 inputs before token ``end`` of the sequence from row ``start`` (``[BLOCK_K,
    BLOCK_C]``, oldest first, in the state's dtype): from x, or from the slot's state at
    ``base`` (its channels' rows) for those before the step's first token."""
    j = end - KM1 + ks  # the input that becomes state column k
    from_x = tl.load(x_ptr + (start + j)[:, None] * sx_t + cs[None, :],
                     mask=(km & (j >= 0))[:, None] & cm[None, :], other=0.0)
    from_state = tl.load(base + (KM1 + j)[:, None], mask=(km & (j < 0))[:, None] & cm[None, :],
                         other=0.0)
    return from_x.to(state_ptr.dtype.element_ty) + from_state


@triton.jit
def _conv_kernel(x_ptr, w_ptr, bias_ptr, state_ptr, qsl_ptr, idx_ptr, out_ptr, snap_ptr,
                 save_first_ptr, save_off_ptr, save_slot_ptr, C, sx_t, sw_c, ss_slot, ss_c, so_t,
                 snap_slot, K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                 SAVES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    s = tl.program_id(0)
    start = tl.load(qsl_ptr + s).to(tl.int64)
    length = tl.load(qsl_ptr + s + 1).to(tl.int64) - start
    ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    tm, cm = ts < length, cs < C
    slot = tl.load(idx_ptr + s).to(tl.int64)
    base = state_ptr + slot * ss_slot + cs[None, :] * ss_c
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        j = ts - (K - 1) + k  # the input this tap reads
        from_x = tl.load(x_ptr + (start + j)[:, None] * sx_t + cs[None, :],
                         mask=(tm & (j >= 0))[:, None] & cm[None, :], other=0.0)
        from_state = tl.load(base + (K - 1 + j)[:, None],
                             mask=(tm & (j < 0))[:, None] & cm[None, :], other=0.0)
        w = tl.load(w_ptr + cs * sw_c + k, mask=cm, other=0.0).to(tl.float32)
        acc += (from_x.to(tl.float32) + from_state.to(tl.float32)) * w[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cs, mask=cm, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + (start + ts)[:, None] * so_t + cs[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=tm[:, None] & cm[None, :])
    if tl.program_id(1) == 0:  # the first block of tokens: the only one that read the state
        ks = tl.arange(0, BLOCK_K)
        km = ks < K - 1
        if SAVES:
            # the sequence's saves (``recurrent_pieces.SavePlan``): the window before each
            # offset, read from the state before this program overwrites it (the barrier below)
            for n in range(tl.load(save_first_ptr + s), tl.load(save_first_ptr + s + 1)):
                offset = tl.load(save_off_ptr + n).to(tl.int64)
                pool_slot = tl.load(save_slot_ptr + n).to(tl.int64)
                kept = _window(x_ptr, state_ptr, start, offset, base, ks, cs, km, cm, sx_t, K - 1)
                tl.store(snap_ptr + pool_slot * snap_slot + cs[None, :] * (K - 1) + ks[:, None],
                         kept.to(snap_ptr.dtype.element_ty), mask=km[:, None] & cm[None, :])
        new = _window(x_ptr, state_ptr, start, length, base, ks, cs, km, cm, sx_t, K - 1)
        # Every read of the old state in this program (the outputs' taps above, the saves'
        # and the new state's windows; shorter than K - 1 (decodes), column k takes the old
        # column k + length, another thread's, maybe another warp's) comes before any write:
        # the barrier orders them. (Compiled for sm90 today the state tile's layout conversion
        # through shared memory already puts a barrier there, and the compiler merges the two;
        # this one does not depend on the layouts it picks.)
        tl.debug_barrier()
        tl.store(base + ks[:, None], new, mask=km[:, None] & cm[None, :])


_conv_launch = FastLaunch(_conv_kernel)  # (kernels/launch.py: no per-call binding on a hit)


def mamba_conv1d(x, weight, bias, conv_state, batch, activation="silu",
                 snapshots=None) -> torch.Tensor:
    """``x [T, C]`` (rows contiguous), ``weight [C, K]``, ``bias [C]`` or None, ``conv_state
    [slots, C, K - 1]`` (last dim contiguous); ``batch`` a ``MambaBatch``. Returns ``[T, C]``.
    ``snapshots [S, C, K - 1]`` (contiguous): with ``batch.state_saves``, the conv state after
    each save's offset is stored into its slot by the state launch (no launch of its own)."""
    T, C = x.shape
    K = weight.shape[1]
    out = torch.empty_like(x)
    seqs = batch.state_indices.shape[0]  # a shape: a captured decode step has no host slots
    if T == 0 or seqs == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    # the saves are the op's only given the pool (else the caller took them)
    saves = snapshots is not None and bool(getattr(batch, "state_saves", None))
    if saves:
        snap, first, offs, pslots = save_pointers(batch, snapshots, conv_state, "mamba_conv1d")
    else:  # placeholders the kernel never reads
        snap, first, offs, pslots = conv_state, *(batch.query_start_loc,) * 3
    # the longest sequence: the leading decodes have one token (only the rest are walked on
    # the host, once a layer: a mixed step's hundreds of decodes cost nothing here)
    qsl = batch.query_start_loc_host[batch.num_decodes:]
    longest = max((b - a for a, b in zip(qsl, qsl[1:])), default=1)
    # two variants only, both met by the serving warm-up (core/warmup.py): steps of decodes
    # alone, and any step with a longer sequence (a block per length would compile 2, 4, 8 on
    # the first prompts of those lengths after ready)
    # (a block of tokens at least K - 1 long: only the first block of a sequence reads its
    # state, and that program writes the new one after all its reads)
    block_t = 1 if longest == 1 else max(16, next_power_of_2(K - 1))
    block_c = min(next_power_of_2(C), 64)
    _conv_launch((seqs, cdiv(longest, block_t), cdiv(C, block_c)),
                 (x, weight, bias if bias is not None else weight, conv_state,
                  batch.query_start_loc, batch.state_indices, out, snap, first, offs, pslots),
                 (C, x.stride(0), weight.stride(0), conv_state.stride(0), conv_state.stride(1),
                  out.stride(0), snap.stride(0)),
                 {"K": K, "HAS_BIAS": bias is not None, "SILU": activation == "silu",
                  "SAVES": saves, "BLOCK_T": block_t, "BLOCK_K": next_power_of_2(K - 1),
                  "BLOCK_C": block_c})
    return out
