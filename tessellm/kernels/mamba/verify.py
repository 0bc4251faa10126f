"""The Mamba2 mixer's verify ops of speculative decoding in Triton, one launch each
(``FusedOps.mamba_conv1d_verify`` / ``mamba_state_update_verify``; oracles:
``backends/reference/recurrent_verify.py``).

A verify sequence carries ``L = 1 + k`` tokens (a sampled token and its drafts) and must leave
the state after *each* token in a slot of its own (``MambaBatch.token_slots``; the last one in
the sequence's own slot), so the engine can keep the one after the accepted prefix. One program
per sequence (and head, block of rows) runs the recurrence over its L tokens with the state in
registers, writing each token's output and the state after it::

    program (s, h, p-block):   state <- ssm_state[state_indices[s], h, ps, :]     (read once, first)
    for j in 0 .. L - 1:       state <- the one-token update with token start + j
                               ssm_state[token_slots[start + j], h, ps, :] <- state
                               y[start + j] <- state . C + D x

The composed path (the one-token kernel run L times, a state copy before each) reads the state
back from its slot each token; here the register copy is rounded to the state's dtype after
each store, so the two give the same numbers. Nothing reads a host list: a captured verify step
(state slots and token slots as graph inputs) can replay these.

The conv keeps its start window (the K - 1 inputs before the sequence) in registers and reads
each token's taps from x, so the state after token j (its last K - 1 inputs) can go straight to
its slot; the sequence's own slot is read before the loop and written only at its last token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.host_ints import cdiv, next_power_of_2


@triton.jit
def _conv_verify_kernel(x_ptr, w_ptr, bias_ptr, state_ptr, qsl_ptr, idx_ptr, tslot_ptr, out_ptr,
                        C, sx_t, sw_c, ss_slot, ss_c, so_t, K: tl.constexpr,
                        HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    s = tl.program_id(0)
    start = tl.load(qsl_ptr + s).to(tl.int64)
    length = tl.load(qsl_ptr + s + 1).to(tl.int64) - start
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.arange(0, BLOCK_K)
    cm = cs < C
    slot = tl.load(idx_ptr + s).to(tl.int64)
    # the start window [BLOCK_C, K - 1], read whole before any state of this sequence is written
    window = tl.load(state_ptr + slot * ss_slot + cs[:, None] * ss_c + ks[None, :],
                     mask=cm[:, None] & (ks < K - 1)[None, :], other=0.0).to(tl.float32)
    ws = tl.arange(0, BLOCK_W)
    weights = tl.load(w_ptr + cs[:, None] * sw_c + ws[None, :],  # [BLOCK_C, K], read once
                      mask=cm[:, None] & (ws < K)[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cs, mask=cm, other=0.0).to(tl.float32)
    for j in range(0, length):
        out_slot = tl.load(tslot_ptr + start + j).to(tl.int64)
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for k in tl.static_range(K):
            i = j - (K - 1) + k  # the input this tap reads: x row start + i, or window column j + k
            rows = start + i + tl.zeros_like(cs)  # a vector: the interpreter's j is an int
            from_x = tl.load(x_ptr + rows * sx_t + cs, mask=cm & (rows >= start), other=0.0)
            from_window = tl.sum(tl.where(ks[None, :] == j + k, window, 0.0), axis=1)
            val = from_x.to(tl.float32) + from_window  # one of the two is 0: exact
            acc += val * tl.sum(tl.where(ws[None, :] == k, weights, 0.0), axis=1)
            if k > 0:  # the state after token j: its last K - 1 inputs (taps 1 .. K - 1)
                tl.store(state_ptr + out_slot * ss_slot + cs * ss_c + (k - 1),
                         val.to(state_ptr.dtype.element_ty), mask=cm)
        if HAS_BIAS:
            acc += bias
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        tl.store(out_ptr + (start + j) * so_t + cs, acc.to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _ssm_verify_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dt_bias_ptr, state_ptr,
                       qsl_ptr, idx_ptr, tslot_ptr, y_ptr, heads_per_group, P, N, dt_lo, dt_hi,
                       sx_t, sx_h, sdt_t, sb_t, sb_g, sc_t, sc_g, ss_slot, ss_h, ss_p, sy_t, sy_h,
                       CLAMP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    pm, nm = ps < P, ns < N
    g = h // heads_per_group
    start = tl.load(qsl_ptr + s).to(tl.int64)
    length = tl.load(qsl_ptr + s + 1).to(tl.int64) - start
    slot = tl.load(idx_ptr + s).to(tl.int64)
    a = tl.load(a_ptr + h).to(tl.float32)
    d = tl.load(d_ptr + h).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32)
    tile = h * ss_h + ps[:, None] * ss_p + ns[None, :]
    smask = pm[:, None] & nm[None, :]
    state = tl.load(state_ptr + slot * ss_slot + tile, mask=smask, other=0.0).to(tl.float32)
    for j in range(0, length):
        t = start + j
        dt = tl.load(dt_ptr + t * sdt_t + h).to(tl.float32) + dt_bias
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))  # torch's softplus
        if CLAMP:
            dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
        decay = tl.exp(dt * a)
        x = tl.load(x_ptr + t * sx_t + h * sx_h + ps, mask=pm, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + t * sb_t + g * sb_g + ns, mask=nm, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + t * sc_t + g * sc_g + ns, mask=nm, other=0.0).to(tl.float32)
        state = state * decay + (dt * x)[:, None] * b[None, :]
        kept = state.to(state_ptr.dtype.element_ty)
        out_slot = tl.load(tslot_ptr + t).to(tl.int64)
        tl.store(state_ptr + out_slot * ss_slot + tile, kept, mask=smask)
        y = tl.sum(state * c[None, :], axis=1) + d * x
        tl.store(y_ptr + t * sy_t + h * sy_h + ps, y.to(y_ptr.dtype.element_ty), mask=pm)
        state = kept.to(tl.float32)  # what the next token reads back from the slot


TILE = 8192  # the most state elements a program holds (BLOCK_P x BLOCK_N)


def mamba_conv1d_verify(x, weight, bias, conv_state, batch, activation="silu") -> torch.Tensor:
    """``x [T, C]`` (the verify rows), ``weight [C, K]``, ``bias [C]`` or None, ``conv_state
    [slots, C, K - 1]`` (last dim contiguous); ``batch``: the step's ``MambaBatch.verifies``.
    Returns ``[T, C]``; the conv state after each token lands in its ``token_slots`` slot."""
    T, C = x.shape
    K = weight.shape[1]
    out = torch.empty_like(x)
    seqs = batch.state_indices.shape[0]
    if T == 0 or seqs == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    if conv_state.stride(-1) != 1:
        raise ValueError("mamba_conv1d_verify needs a conv_state whose last dim is contiguous.")
    block_c = min(next_power_of_2(C), 64)
    _conv_verify_kernel[(seqs, cdiv(C, block_c))](
        x, weight, bias if bias is not None else weight, conv_state, batch.query_start_loc,
        batch.state_indices, batch.token_slots, out, C, x.stride(0), weight.stride(0),
        conv_state.stride(0), conv_state.stride(1), out.stride(0), K=K,
        HAS_BIAS=bias is not None, SILU=activation == "silu",
        BLOCK_K=next_power_of_2(max(K - 1, 1)), BLOCK_W=next_power_of_2(K),
        BLOCK_C=block_c)
    return out


def mamba_state_update_verify(x, dt, A, B, C, D, dt_bias, ssm_state, batch,
                              dt_limit=(0.0, float("inf"))) -> torch.Tensor:
    """``x [T, H, P]``, ``dt [T, H]``, ``A, D, dt_bias [H]``, ``B, C [T, G, N]``, ``ssm_state
    [slots, H, P, N]`` (last dim contiguous); ``batch``: the step's ``MambaBatch.verifies``. Returns
    ``y [T, H, P]``; the state after each token lands in its ``token_slots`` slot."""
    T, H, P = x.shape
    N = ssm_state.shape[-1]
    y = torch.empty_like(x)
    seqs = batch.state_indices.shape[0]
    if T == 0 or seqs == 0:
        return y
    x, dt, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dt, B, C))
    if ssm_state.stride(-1) != 1:
        raise ValueError("mamba_state_update_verify needs an ssm_state whose last dim is "
                         "contiguous.")
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    block_n = next_power_of_2(N)
    block_p = min(next_power_of_2(P), 32, max(TILE // block_n, 1))  # the one-token's
    _ssm_verify_kernel[(seqs, H, cdiv(P, block_p))](
        x, dt, A, B, C, D, dt_bias, ssm_state, batch.query_start_loc, batch.state_indices,
        batch.token_slots, y, H // B.shape[1], P, N, lo, hi if hi != float("inf") else 3.0e38,
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0),
        C.stride(1), ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0),
        y.stride(1), CLAMP=lo > 0.0 or hi != float("inf"), BLOCK_P=block_p,
        BLOCK_N=block_n)
    return y
