"""The gated delta rule's verify op of speculative decoding in Triton, one launch
(``FusedOps.gated_delta_verify``; the oracle is ``backends/reference/recurrent_verify.py``).

Each verify sequence (a sampled token and its drafts, ``L = 1 + k`` tokens) runs the one-token
recurrence (``step.py``) over its tokens with the state tile in registers, and leaves the state
after each token in that token's ``MambaBatch.token_slots`` slot (the last one in the
sequence's own slot, read before anything is written)::

    program (s, h, v-block):   S <- state[state_indices[s], h, :, vs]          (K x BLOCK_V)
    for j in 0 .. L - 1:       S <- exp(g) S;  S <- S + k (outer) beta (v - S^T k)
                               state[token_slots[start + j], h, :, vs] <- S
                               o[start + j] <- S^T (q * scale)

As in ``kernels/mamba/verify.py`` the register state is rounded to the state's dtype after
each store (what the one-token kernel run token after token reads back), and nothing reads a
host list, so a captured verify step can replay it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.gated_delta.chunk import L2_EPS


@triton.jit
def _verify_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, qsl_ptr, idx_ptr, tslot_ptr,
                   o_ptr, scale, eps, values_per_key, K, V, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
                   sg_t, sb_t, ss_slot, ss_h, ss_k, so_t, so_h,
                   BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    vs = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_K)
    km, vm = ks < K, vs < V
    kh = h // values_per_key
    start = tl.load(qsl_ptr + s).to(tl.int64)
    length = tl.load(qsl_ptr + s + 1).to(tl.int64) - start
    slot = tl.load(idx_ptr + s).to(tl.int64)
    tile = h * ss_h + ks[:, None] * ss_k + vs[None, :]
    smask = km[:, None] & vm[None, :]
    state = tl.load(state_ptr + slot * ss_slot + tile, mask=smask, other=0.0).to(tl.float32)
    for j in range(0, length):
        t = start + j
        q = tl.load(q_ptr + t * sq_t + kh * sq_h + ks, mask=km, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + t * sk_t + kh * sk_h + ks, mask=km, other=0.0).to(tl.float32)
        q = q * (tl.rsqrt(tl.sum(q * q, axis=0) + eps) * scale)
        k = k * tl.rsqrt(tl.sum(k * k, axis=0) + eps)
        v = tl.load(v_ptr + t * sv_t + h * sv_h + vs, mask=vm, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + t * sg_t + h).to(tl.float32)
        beta = tl.load(beta_ptr + t * sb_t + h).to(tl.float32)
        state = state * tl.exp(g)
        delta = (v - tl.sum(state * k[:, None], axis=0)) * beta  # [BLOCK_V]
        state += k[:, None] * delta[None, :]
        kept = state.to(state_ptr.dtype.element_ty)
        out_slot = tl.load(tslot_ptr + t).to(tl.int64)
        tl.store(state_ptr + out_slot * ss_slot + tile, kept, mask=smask)
        o = tl.sum(state * q[:, None], axis=0)
        tl.store(o_ptr + t * so_t + h * so_h + vs, o.to(o_ptr.dtype.element_ty), mask=vm)
        state = kept.to(tl.float32)  # what the next token reads back from the slot


TILE = 8192  # the most state elements a program holds (K x BLOCK_V)


def gated_delta_verify(q, k, v, g, beta, state, batch, scale: float) -> torch.Tensor:
    """``q, k [T, Hk, K]``, ``v [T, Hv, V]``, ``g, beta [T, Hv]``, ``state [slots, Hv, K, V]``
    (last dim contiguous); ``batch``: the step's ``MambaBatch.verifies``. Returns ``o [T, Hv, V]``; the
    state after each token lands in its ``token_slots`` slot."""
    T, H, V = v.shape
    K = q.shape[-1]
    o = torch.empty_like(v)
    seqs = batch.state_indices.shape[0]
    if T == 0 or seqs == 0:
        return o
    q, k, v, g, beta = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, g, beta))
    if state.stride(-1) != 1:
        raise ValueError("gated_delta_verify needs a state whose last dim is contiguous.")
    block_k = triton.next_power_of_2(K)
    block_v = min(triton.next_power_of_2(V), 32, max(TILE // block_k, 1))  # the one-token's
    _verify_kernel[(seqs, H, triton.cdiv(V, block_v))](
        q, k, v, g, beta, state, batch.query_start_loc, batch.state_indices, batch.token_slots, o,
        float(scale), L2_EPS, H // q.shape[1], K, V, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), g.stride(0), beta.stride(0), state.stride(0),
        state.stride(1), state.stride(2), o.stride(0), o.stride(1),
        BLOCK_K=block_k, BLOCK_V=block_v)
    return o
