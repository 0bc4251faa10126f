"""The gated delta rule over prefill chunks in Triton (``FusedOps.gated_delta_chunk``; the
oracle is ``backends/reference/gated_delta.gated_delta_chunk``).

One program per (sequence, value head, block of value dims) walks its sequence ``Q`` tokens at
a time, carrying its columns of the state ``S [K, BLOCK_V]`` in registers from the slot's
initial state to the final one, which it writes back. Per chunk, with ``a = cumsum(g)`` over its
tokens and ``D[i, j] = exp(a_i - a_j)`` for ``j <= i`` (a token past the sequence's end has
``g = beta = 0`` and zero q, k, v: it neither decays nor writes)::

    A  = strict_lower(beta_i (k_i . k_j) D[i, j])        T = (I + A)^-1   (forward substitution)
    v' = T (beta v) - T (beta k exp(a)) S               what each token writes, net of S
    o  = (q exp(a)) S + ((q k^T) * D) v'
    S  = exp(a_Q) S + (k exp(a_Q - a))^T v'

This is fla's chunked WY form (``chunk_scaled_dot_kkt``, ``solve_tril``, ``recompute_w_u``,
``chunk_fwd_h``, ``chunk_fwd_o``) fused into one pass per sequence and head: no intermediates
in memory and one launch, at the price of walking a long prompt's chunks in sequence (fla
computes the chunks' outputs in parallel once the chunk states are known). The key-side work
(``A``, ``T``) is repeated by each value block. ``Q`` (32) is the kernel's own; products are
float32 (``tf32x3`` on tensor cores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.host_ints import cdiv, next_power_of_2
from tessellm.kernels.launch import fast_launch
from tessellm.kernels.recurrent_pieces import save_pointers
from tessellm.kernels.recurrent_saves import chunk_end, keep_state

# The in-op L2 normalization's epsilon of q and k: the contract's (the reference's
# ``backends.reference.gated_delta.L2_EPS``; kernels import no backend, and
# tests/kernels/test_gated_delta_kernels.py checks the two agree).
L2_EPS = 1e-6

Q = 32


@triton.jit
def _delta_chunk(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, state, start, c0, end, h, kh,
                 scale, eps, ks, vs, ls, km, vm, causal, strict, unit, sq_t, sq_h, sk_t, sk_h,
                 sv_t, sv_h, sg_t, sb_t, so_t, so_h, Q: tl.constexpr):
    """Tokens ``c0 .. end - 1`` (at most ``Q``) of a sequence: stores their ``o`` and returns
    the state after them."""
    rows = c0 + ls
    rm = rows < end
    tok = start + rows
    q = tl.load(q_ptr + tok[:, None] * sq_t + kh * sq_h + ks[None, :],
                mask=rm[:, None] & km[None, :], other=0.0).to(tl.float32)  # [Q, BLOCK_K]
    k = tl.load(k_ptr + tok[:, None] * sk_t + kh * sk_h + ks[None, :],
                mask=rm[:, None] & km[None, :], other=0.0).to(tl.float32)
    q = q * (tl.rsqrt(tl.sum(q * q, axis=1) + eps) * scale)[:, None]
    k = k * tl.rsqrt(tl.sum(k * k, axis=1) + eps)[:, None]
    v = tl.load(v_ptr + tok[:, None] * sv_t + h * sv_h + vs[None, :],
                mask=rm[:, None] & vm[None, :], other=0.0).to(tl.float32)  # [Q, BLOCK_V]
    g = tl.load(g_ptr + tok * sg_t + h, mask=rm, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + tok * sb_t + h, mask=rm, other=0.0).to(tl.float32)
    a = tl.cumsum(g, axis=0)  # [Q]
    a_end = tl.sum(g, axis=0)
    decay = tl.exp(tl.where(causal, a[:, None] - a[None, :], float("-inf")))  # [Q, Q]
    kk = tl.dot(k, tl.trans(k), input_precision="tf32x3")
    A = tl.where(strict, kk * decay * beta[:, None], 0.0)
    # T = (I + A)^-1 row by row: T[i] = e_i - sum_{j < i} A[i, j] T[j]
    T = unit
    for i in tl.static_range(1, Q):
        a_row = tl.sum(tl.where(ls[:, None] == i, A, 0.0), axis=0)  # A[i, :]
        t_row = tl.sum(a_row[:, None] * T, axis=0)
        T = tl.where(ls[:, None] == i, T - t_row[None, :], T)
    u = tl.dot(T, v * beta[:, None], input_precision="tf32x3")  # [Q, BLOCK_V]
    w = tl.dot(T, k * (beta * tl.exp(a))[:, None], input_precision="tf32x3")  # [Q, BLOCK_K]
    v_net = u - tl.dot(w, state, input_precision="tf32x3")
    qk = tl.dot(q, tl.trans(k), input_precision="tf32x3") * decay
    o = tl.dot(q * tl.exp(a)[:, None], state, input_precision="tf32x3")
    o += tl.dot(qk, v_net, input_precision="tf32x3")
    tl.store(o_ptr + tok[:, None] * so_t + h * so_h + vs[None, :],
             o.to(o_ptr.dtype.element_ty), mask=rm[:, None] & vm[None, :])
    k_out = k * tl.exp(a_end - a)[:, None]
    return tl.exp(a_end) * state + tl.dot(tl.trans(k_out), v_net, input_precision="tf32x3")


@triton.jit
def _chunk_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, qsl_ptr, idx_ptr, o_ptr,
                  snap_ptr, save_first_ptr, save_off_ptr, save_slot_ptr,
                  scale, eps, values_per_key, K, V, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t,
                  sb_t, ss_slot, ss_h, ss_k, so_t, so_h, snap_slot, SAVES: tl.constexpr,
                  Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(qsl_ptr + s).to(tl.int64)
    length = tl.load(qsl_ptr + s + 1).to(tl.int64) - start
    slot = tl.load(idx_ptr + s).to(tl.int64)
    kh = h // values_per_key
    vs = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_K)
    ls = tl.arange(0, Q)
    km, vm = ks < K, vs < V
    inner = h * ss_h + ks[:, None] * ss_k + vs[None, :]
    sptrs = state_ptr + slot * ss_slot + inner
    smask = km[:, None] & vm[None, :]
    state = tl.load(sptrs, mask=smask, other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_V]
    causal = ls[:, None] >= ls[None, :]
    strict = ls[:, None] > ls[None, :]
    unit = tl.where(ls[:, None] == ls[None, :], 1.0, 0.0)
    if SAVES:
        # as the sequential Mamba scan (``kernels/recurrent_saves.py``): a chunk ends at each
        # save offset, whose state is then stored into its snapshot slot, and the next chunk
        # starts there
        n = tl.load(save_first_ptr + s)
        n_end = tl.load(save_first_ptr + s + 1)
        c0 = start * 0
        while (c0 < length) | (n < n_end):
            end, cut = chunk_end(c0, length, n, n_end, save_off_ptr, Q)
            state = _delta_chunk(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, state, start, c0,
                                 end, h, kh, scale, eps, ks, vs, ls, km, vm, causal, strict, unit,
                                 sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sb_t, so_t, so_h, Q)
            n = keep_state(state, end, cut, n, n_end, save_slot_ptr, snap_ptr, snap_slot, inner,
                           smask)
            c0 = end
    else:
        for c0 in range(0, length, Q):
            state = _delta_chunk(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, state, start, c0,
                                 length, h, kh, scale, eps, ks, vs, ls, km, vm, causal, strict,
                                 unit, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sb_t, so_t, so_h,
                                 Q)
    tl.store(sptrs, state.to(state_ptr.dtype.element_ty), mask=smask)


def gated_delta_chunk(q, k, v, g, beta, state, batch, scale: float,
                      snapshots=None) -> torch.Tensor:
    """``q, k [T, Hk, K]``, ``v [T, Hv, V]``, ``g, beta [T, Hv]``, ``state [slots, Hv, K, V]``
    (contiguous); ``batch`` a ``MambaBatch``. Returns ``o [T, Hv, V]``. ``snapshots [S, Hv, K,
    V]`` (contiguous): with ``batch.state_saves``, the state after each save's offset is stored
    into its slot in the same pass (a chunk ends at each offset: the outputs and states of the
    kernel run once per piece between them)."""
    T, H, V = v.shape
    K = q.shape[-1]
    o = torch.empty_like(v)
    seqs = len(batch.state_indices_host)
    if T == 0 or seqs == 0:
        return o
    q, k, v, g, beta = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, g, beta))
    if not state.is_contiguous():
        raise ValueError("gated_delta_chunk needs a contiguous state.")
    saves = getattr(batch, "state_saves", None)
    snap, first, offs, pslots = save_pointers(batch, snapshots, state, "gated_delta_chunk")
    block_v, warps = chunk_config(K, V)
    fast_launch(_chunk_kernel)(  # (kernels/launch.py: no per-call binding on a hit)
        (seqs, H, cdiv(V, block_v)),
        (q, k, v, g, beta, state, batch.query_start_loc, batch.state_indices, o, snap, first,
         offs, pslots),
        (float(scale), L2_EPS, H // q.shape[1], K, V, q.stride(0), q.stride(1), k.stride(0),
         k.stride(1), v.stride(0), v.stride(1), g.stride(0), beta.stride(0), state.stride(0),
         state.stride(1), state.stride(2), o.stride(0), o.stride(1), snap.stride(0)),
        {"SAVES": bool(saves), "Q": Q, "BLOCK_K": max(16, next_power_of_2(K)),
         "BLOCK_V": block_v, "num_warps": warps})
    return o


def chunk_config(K: int, V: int) -> tuple[int, int]:
    """The chunk kernel's value dims a program and warps for key dim ``K``, value dim ``V``.
    Each program reads the chunk's keys and queries whole (K wide) for its BLOCK_V value dims,
    so wide value blocks repeat that work least: on an H100 at Qwen3-Next's K = V = 128,
    (64, 8) took 0.125 / 1.76 ms for 128 / 2048 tokens against 0.445 / 6.98 for (32, 4), the
    earlier default (``benchmarks/kernels/bench_seq_tiles.py``, benchmarks/README.md session 22).
    Eight warps keep the [K, 64] state block at 32 registers a thread for K = 128."""
    return max(16, min(next_power_of_2(V), 64)), (8 if K > 64 else 4)
