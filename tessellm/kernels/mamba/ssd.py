"""The Mamba2 SSD scan of prefill chunks as parallel Triton kernels (``FusedOps.mamba_chunk_scan``;
the oracle is ``backends/reference/mamba.ssd_chunk_scan``).

Each sequence of the step is cut into chunks of ``Q`` tokens from its first token (its last
chunk shorter), numbered over the whole step (``nc`` chunks). With ``a = cumsum(dt * A)`` over
a chunk's tokens and ``h_in`` the state entering it::

    y_l   = sum_{s <= l} (C_l . B_s) exp(a_l - a_s) dt_s x_s  +  exp(a_l) C_l . h_in  +  D x_l
    h_out = exp(a_end) h_in  +  sum_s exp(a_end - a_s) dt_s x_s (outer) B_s

Five launches, each parallel over chunks (and heads, tiles) except the third, which walks each
sequence's chunks (a few dozen steps of an ``[H, P, N]`` update, not its tokens)::

    1. _dt_cumsum     (chunk, heads)       dt = clamp(softplus(dt + bias)), a = cumsum(dt A)
    2. _chunk_cb      (chunk, group, rows)  C B^T of the chunk, shared by the group's heads
    3. _chunk_states  (chunk, head, tile)   the chunk's own contribution to h_out, h_in = 0
    4. _state_passing (sequence, head, tile) h_in of every chunk from the slot's state; the
                                              sequence's final state back to its slot
    5. _chunk_output  (chunk rows, head, tile) y

Everything is float32 (``tf32x3`` products for float32 inputs: float32-level accuracy; plain
TF32 for 16-bit inputs, whose B, C and x are exact in TF32; float32 on ROCm). Scratch: the
chunk states, float32 ``[nc, H, P, N]`` (the largest), and ``[H, nc, Q]`` dt and cumsums,
``[nc, G, Q, Q]`` C B^T.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tessellm.kernels.host_ints import cdiv, next_power_of_2
from tessellm.kernels.launch import fast_launch

CHUNK = 128  # Q: tokens a chunk (a power of two, a multiple of the row / column blocks below)


@triton.jit(do_not_specialize=["nc"])  # (one variant for any chunk count)
def _dt_cumsum(dt_ptr, a_ptr, bias_ptr, meta_ptr, dtc_ptr, acs_ptr, H, nc, dt_lo, dt_hi,
               sdt_t, CLAMP: tl.constexpr, Q: tl.constexpr, BLOCK_H: tl.constexpr):
    c = tl.program_id(0)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ls = tl.arange(0, Q)
    start = tl.load(meta_ptr + 2 * c).to(tl.int64)
    length = tl.load(meta_ptr + 2 * c + 1)
    hm, lm = hs < H, ls < length
    dt = tl.load(dt_ptr + (start + ls)[:, None] * sdt_t + hs[None, :],
                 mask=lm[:, None] & hm[None, :], other=0.0).to(tl.float32)  # [Q, BLOCK_H]
    dt += tl.load(bias_ptr + hs, mask=hm, other=0.0).to(tl.float32)[None, :]
    dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    dt = tl.where(lm[:, None], dt, 0.0)  # past the sequence's end: no decay, no input
    a = tl.cumsum(dt * tl.load(a_ptr + hs, mask=hm, other=0.0).to(tl.float32)[None, :], axis=0)
    offs = hs[None, :].to(tl.int64) * nc * Q + c * Q + ls[:, None]
    tl.store(dtc_ptr + offs, dt, mask=hm[None, :])
    tl.store(acs_ptr + offs, a, mask=hm[None, :])


@triton.jit
def _chunk_cb(b_ptr, c_ptr, meta_ptr, cb_ptr, G, N, sb_t, sb_g, sc_t, sc_g,
              PREC: tl.constexpr, Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    c = tl.program_id(0)
    g = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    start = tl.load(meta_ptr + 2 * c).to(tl.int64)
    length = tl.load(meta_ptr + 2 * c + 1)
    ls = m0 + tl.arange(0, BLOCK_M)
    ss = tl.arange(0, Q)
    ks = tl.arange(0, BLOCK_K)
    lm, sm = ls < length, (ss < length) & (ss < m0 + BLOCK_M)  # the causal part only
    acc = tl.zeros((BLOCK_M, Q), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        km = k0 + ks < N
        cc = tl.load(c_ptr + (start + ls)[:, None] * sc_t + g * sc_g + (k0 + ks)[None, :],
                     mask=lm[:, None] & km[None, :], other=0.0).to(tl.float32)
        bb = tl.load(b_ptr + (start + ss)[:, None] * sb_t + g * sb_g + (k0 + ks)[None, :],
                     mask=sm[:, None] & km[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(cc, tl.trans(bb), input_precision=PREC)
    tl.store(cb_ptr + ((c.to(tl.int64) * G + g) * Q + ls[:, None]) * Q + ss[None, :], acc)


@triton.jit(do_not_specialize=["nc"])  # (one variant for any chunk count)
def _chunk_states(x_ptr, b_ptr, meta_ptr, dtc_ptr, acs_ptr, st_ptr, H, heads_per_group, P, N,
                  nc, sx_t, sx_h, sb_t, sb_g, PREC: tl.constexpr, Q: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    c = tl.program_id(0)
    h = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    ps = (tl.program_id(2) // tiles_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = (tl.program_id(2) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    pm, nm = ps < P, ns < N
    g = h // heads_per_group
    start = tl.load(meta_ptr + 2 * c).to(tl.int64)
    length = tl.load(meta_ptr + 2 * c + 1)
    row = (h.to(tl.int64) * nc + c) * Q
    a_end = tl.load(acs_ptr + row + Q - 1)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for s0 in range(0, length, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        sm = ss < length
        w = tl.load(dtc_ptr + row + ss) * tl.exp(a_end - tl.load(acs_ptr + row + ss))
        x = tl.load(x_ptr + (start + ss)[:, None] * sx_t + h * sx_h + ps[None, :],
                    mask=sm[:, None] & pm[None, :], other=0.0).to(tl.float32)  # [S, BLOCK_P]
        bb = tl.load(b_ptr + (start + ss)[:, None] * sb_t + g * sb_g + ns[None, :],
                     mask=sm[:, None] & nm[None, :], other=0.0).to(tl.float32)  # [S, BLOCK_N]
        acc += tl.dot(tl.trans(x * w[:, None]), bb, input_precision=PREC)
    tl.store(st_ptr + ((c.to(tl.int64) * H + h) * P + ps[:, None]) * N + ns[None, :], acc,
             mask=pm[:, None] & nm[None, :])


@triton.jit(do_not_specialize=["nc"])  # (one variant for any chunk count)
def _state_passing(state_ptr, idx_ptr, seq_chunks_ptr, acs_ptr, st_ptr, H, PN, nc, ss_slot,
                   ss_h, Q: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    slot = tl.load(idx_ptr + s).to(tl.int64)
    c0 = tl.load(seq_chunks_ptr + s).to(tl.int64)
    n = tl.load(seq_chunks_ptr + s + 1) - tl.load(seq_chunks_ptr + s)
    sptrs = state_ptr + slot * ss_slot + h * ss_h + offs  # a head's [P, N] is contiguous
    state = tl.load(sptrs, mask=m, other=0.0).to(tl.float32)
    # chunk c + 1's own state and decay are loaded before chunk c's store (prefetched: the loop
    # is latency-bound, and the store may alias the next load for the compiler)
    ptrs = st_ptr + (c0 * H + h) * PN + offs
    dec = tl.load(acs_ptr + (h * nc + c0) * Q + Q - 1, mask=n > 0, other=0.0)
    own = tl.load(ptrs, mask=m & (offs < PN * n), other=0.0)  # (n == 0: nothing to load)
    for i in range(0, n):
        dec_next = tl.load(acs_ptr + (h * nc + c0 + i + 1) * Q + Q - 1, mask=i + 1 < n,
                           other=0.0)
        own_next = tl.load(ptrs + H * PN, mask=m & (offs < PN * (n - 1 - i)), other=0.0)
        tl.store(ptrs, state, mask=m)  # the chunk's slot now holds the state entering it
        state = tl.exp(dec) * state + own
        ptrs += H * PN
        dec, own = dec_next, own_next
    tl.store(sptrs, state.to(state_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["nc"])  # (one variant for any chunk count)
def _chunk_output(x_ptr, c_ptr, d_ptr, meta_ptr, dtc_ptr, acs_ptr, cb_ptr, st_ptr, y_ptr, H, G,
                  heads_per_group, P, N, nc, sx_t, sx_h, sc_t, sc_g, sy_t, sy_h,
                  PREC: tl.constexpr, Q: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    c = tl.program_id(0) // (Q // BLOCK_M)
    m0 = (tl.program_id(0) % (Q // BLOCK_M)) * BLOCK_M
    h = tl.program_id(1)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    start = tl.load(meta_ptr + 2 * c).to(tl.int64)
    length = tl.load(meta_ptr + 2 * c + 1)
    if m0 >= length:
        return
    g = h // heads_per_group
    ls = m0 + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    lm, pm = ls < length, ps < P
    row = (h.to(tl.int64) * nc + c) * Q
    a_l = tl.load(acs_ptr + row + ls)
    # the state entering the chunk, read through C: exp(a_l) C_l . h_in
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    st = st_ptr + (c.to(tl.int64) * H + h) * P * N
    for k0 in range(0, N, BLOCK_K):
        km = k0 + ks < N
        cc = tl.load(c_ptr + (start + ls)[:, None] * sc_t + g * sc_g + (k0 + ks)[None, :],
                     mask=lm[:, None] & km[None, :], other=0.0).to(tl.float32)
        hh = tl.load(st + ps[None, :] * N + (k0 + ks)[:, None], mask=km[:, None] & pm[None, :],
                     other=0.0)  # [BLOCK_K, BLOCK_P]
        acc += tl.dot(cc, hh, input_precision=PREC)
    acc *= tl.exp(a_l)[:, None]
    # the chunk's own tokens up to each row: (C B^T * decay) @ (dt x)
    cb = cb_ptr + ((c.to(tl.int64) * G + g) * Q + ls[:, None]) * Q
    for s0 in range(0, tl.minimum(m0 + BLOCK_M, length), BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        sm = ss < length
        a_s = tl.load(acs_ptr + row + ss)
        dt_s = tl.load(dtc_ptr + row + ss)
        causal = (ls[:, None] >= ss[None, :]) & sm[None, :]
        w = tl.load(cb + ss[None, :]) * tl.exp(tl.where(causal, a_l[:, None] - a_s[None, :],
                                                          float("-inf")))
        x = tl.load(x_ptr + (start + ss)[:, None] * sx_t + h * sx_h + ps[None, :],
                    mask=sm[:, None] & pm[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(w, x * dt_s[:, None], input_precision=PREC)
    x = tl.load(x_ptr + (start + ls)[:, None] * sx_t + h * sx_h + ps[None, :],
                mask=lm[:, None] & pm[None, :], other=0.0).to(tl.float32)
    acc += tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + (start + ls)[:, None] * sy_t + h * sy_h + ps[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=lm[:, None] & pm[None, :])


class _Chunks:
    """A step's chunking, on the device: per chunk ``[token start, length]`` (int32 ``[nc, 2]``)
    and per sequence its first chunk (int32 ``[seqs + 1]``)."""

    def __init__(self, qsl_host: list[int], q: int, device: torch.device, saves=()):
        # ``saves`` (``MambaBatch.state_saves``): chunks also start at each save's offset, so
        # the state entering that chunk (``_state_passing``) is the one to keep; ``save_chunks``
        # and ``save_slots`` (int64, on the device): those chunks and their snapshot slots.
        cuts: dict[int, list] = {}
        for seq, offset, pool_slot in saves:
            cuts.setdefault(seq, []).append((offset, pool_slot))
        meta, firsts, save_chunks, save_slots = [], [0], [], []
        for s, (lo, hi) in enumerate(zip(qsl_host[:-1], qsl_host[1:])):
            bounds = [lo]
            for offset, pool_slot in sorted(cuts.get(s, ())):
                bounds.append(lo + offset)
                save_slots.append(pool_slot)
            bounds.append(hi)
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                if i:
                    save_chunks.append(len(meta) // 2)
                for c0 in range(a, b, q):
                    meta += (c0, min(q, b - c0))
            firsts.append(len(meta) // 2)
        self.count = len(meta) // 2
        meta += [0] * (-len(meta) % 4)  # seq_chunks 16-byte aligned (one Triton variant)
        both = torch.tensor(meta + firsts, dtype=torch.int32).to(device, non_blocking=True)
        self.meta, self.seq_chunks = both[:len(meta)], both[len(meta):len(meta) + len(firsts)]
        self.save_chunks = self.save_slots = None
        if save_chunks:
            idx = torch.tensor(save_chunks + save_slots, dtype=torch.long).to(device,
                                                                              non_blocking=True)
            self.save_chunks, self.save_slots = idx[:len(save_chunks)], idx[len(save_chunks):]


def _chunks(batch, q: int) -> _Chunks:
    """The step's chunking, made by its first Mamba layer and kept on the batch (every layer
    of a step scans the same batch: one upload a step; it goes with the batch, as
    ``MambaBatch.positions`` does). Keyed by the sequence bounds too: a batch object reused
    with other lengths (its lists rewritten in place) gets its own."""
    saves = tuple(getattr(batch, "state_saves", ()))
    key = (q, tuple(batch.query_start_loc_host), saves)
    made = getattr(batch, "_ssd_chunks", None)
    if made is None or made[0] != key:
        made = (key, _Chunks(batch.query_start_loc_host, q, batch.query_start_loc.device, saves))
        batch._ssd_chunks = made
    return made[1]


@functools.lru_cache(maxsize=64)
def launch_configs(H: int, P: int, N: int, Q: int, prec: str, clamp: bool) -> dict:
    """Each kernel's constexprs and warps (what its launch passes; the sm_90 compile test
    compiles these), made once per shape (shared dicts: read, never changed). Tiles and
    warps: no register spills in ``ptxas -v`` for sm_90 at Mamba2-2.7B and Granite 4.0-H
    sizes (P 64, N 128), TF32 and tf32x3 alike; not tuned on a GPU yet."""
    block_p = max(16, min(64, next_power_of_2(P)))
    block_k = max(16, min(32, next_power_of_2(N)))
    block_s = min(32, Q)
    return {
        "_dt_cumsum": dict(CLAMP=clamp, Q=Q, BLOCK_H=min(16, next_power_of_2(H))),
        "_chunk_cb": dict(PREC=prec, Q=Q, BLOCK_M=min(32, Q), BLOCK_K=block_k, num_warps=8),
        "_chunk_states": dict(PREC=prec, Q=Q, BLOCK_S=block_s, BLOCK_P=block_p,
                              BLOCK_N=max(16, min(64, next_power_of_2(N)))),
        "_state_passing": dict(Q=Q, BLOCK=min(1024, next_power_of_2(P * N))),
        "_chunk_output": dict(PREC=prec, Q=Q, BLOCK_M=min(64, Q), BLOCK_S=block_s,
                              BLOCK_P=block_p, BLOCK_K=block_k, num_warps=8),
    }


def ssd_chunk_scan(x, dt, A, B, C, D, dt_bias, ssm_state, batch, dt_limit=(0.0, float("inf")),
                   chunk: int = CHUNK, snapshots=None) -> torch.Tensor:
    """``x [T, H, P]``, ``dt [T, H]``, ``B, C [T, G, N]`` (last dim contiguous), ``ssm_state
    [slots, H, P, N]`` (contiguous); ``batch`` a ``MambaBatch`` with host lists. Returns
    ``y [T, H, P]``; each sequence's final state is written to its slot. ``snapshots``
    ``[S, H, P, N]``: the pool that ``batch.state_saves`` name slots of (the chunks start at
    each save's offset; the state entering that chunk is copied there)."""
    T, H, P = x.shape
    G, N = B.shape[1], ssm_state.shape[-1]
    y = torch.empty_like(x)
    seqs = len(batch.state_indices_host)
    if snapshots is None and getattr(batch, "state_saves", None):
        raise ValueError("ssd_chunk_scan: the batch names state saves but no snapshot pool "
                         "was given (snapshots=).")
    chunks = _chunks(batch, chunk)
    nc, Q = chunks.count, chunk
    if nc == 0:
        return y
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    # (ROCm's Triton may not take TF32 products: full float32 there for 16-bit inputs)
    prec = "tf32x3" if x.dtype == torch.float32 else ("ieee" if torch.version.hip else "tf32")
    dev = x.device
    dtc = torch.empty(H, nc, Q, dtype=torch.float32, device=dev)
    acs = torch.empty(H, nc, Q, dtype=torch.float32, device=dev)
    cb = torch.empty(nc, G, Q, Q, dtype=torch.float32, device=dev)
    states = torch.empty(nc, H, P, N, dtype=torch.float32, device=dev)
    cfg = launch_configs(H, P, N, Q, prec, clamp=lo > 0.0 or hi != float("inf"))
    k = cfg["_dt_cumsum"]
    fast_launch(_dt_cumsum)(
        (nc, cdiv(H, k["BLOCK_H"])), (dt, A, dt_bias, chunks.meta, dtc, acs),
        (H, nc, lo, hi if hi != float("inf") else 3.0e38, dt.stride(0)), k)
    k = cfg["_chunk_cb"]
    fast_launch(_chunk_cb)(
        (nc, G, Q // k["BLOCK_M"]), (B, C, chunks.meta, cb),
        (G, N, B.stride(0), B.stride(1), C.stride(0), C.stride(1)), k)
    k = cfg["_chunk_states"]
    tiles = cdiv(P, k["BLOCK_P"]) * cdiv(N, k["BLOCK_N"])
    fast_launch(_chunk_states)(
        (nc, H, tiles), (x, B, chunks.meta, dtc, acs, states),
        (H, H // G, P, N, nc, x.stride(0), x.stride(1), B.stride(0), B.stride(1)), k)
    k = cfg["_state_passing"]
    fast_launch(_state_passing)(
        (seqs, H, cdiv(P * N, k["BLOCK"])),
        (ssm_state, batch.state_indices, chunks.seq_chunks, acs, states),
        (H, P * N, nc, ssm_state.stride(0), ssm_state.stride(1)), k)
    if chunks.save_chunks is not None:  # the states at the saves' offsets: entering their chunks
        snapshots.index_copy_(0, chunks.save_slots,
                              states.index_select(0, chunks.save_chunks).to(snapshots.dtype))
    k = cfg["_chunk_output"]
    fast_launch(_chunk_output)(
        (nc * (Q // k["BLOCK_M"]), H, cdiv(P, k["BLOCK_P"])),
        (x, C, D, chunks.meta, dtc, acs, cb, states, y),
        (H, G, H // G, P, N, nc, x.stride(0), x.stride(1), C.stride(0), C.stride(1), y.stride(0),
         y.stride(1)), k)
    return y
