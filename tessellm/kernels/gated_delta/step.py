"""The gated delta rule for one token per sequence in Triton (``FusedOps.gated_delta_step``;
the oracle is ``backends/reference/gated_delta.gated_delta_step``), run by every gated DeltaNet
layer for every decoding request each step.

One program per (sequence, value head, block of value dims); it owns those columns of the
state and reads the whole key dim (q and k are L2-normalized in the program)::

    S = state[slot, h, :, vs]   (K x BLOCK_V)           kh = h // (Hv / Hk)
    S = exp(g) S
    S = S + k (outer) beta (v - S^T k)
    o = S^T (q * scale)

The state is read and written in place at ``state_indices[s]``; arithmetic in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.gated_delta.chunk import L2_EPS
from tessellm.kernels.host_ints import cdiv, next_power_of_2
from tessellm.kernels.launch import fast_launch


@triton.jit
def _step_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, idx_ptr, o_ptr, scale, eps,
                 values_per_key, K, V, sq_s, sq_h, sk_s, sk_h, sv_s, sv_h, sg_s, sb_s,
                 ss_slot, ss_h, ss_k, so_s, so_h,
                 BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    vs = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_K)
    km, vm = ks < K, vs < V
    kh = h // values_per_key
    slot = tl.load(idx_ptr + s).to(tl.int64)

    q = tl.load(q_ptr + s * sq_s + kh * sq_h + ks, mask=km, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + s * sk_s + kh * sk_h + ks, mask=km, other=0.0).to(tl.float32)
    q = q * (tl.rsqrt(tl.sum(q * q, axis=0) + eps) * scale)
    k = k * tl.rsqrt(tl.sum(k * k, axis=0) + eps)
    v = tl.load(v_ptr + s * sv_s + h * sv_h + vs, mask=vm, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + s * sg_s + h).to(tl.float32)
    beta = tl.load(beta_ptr + s * sb_s + h).to(tl.float32)

    sptrs = state_ptr + slot * ss_slot + h * ss_h + ks[:, None] * ss_k + vs[None, :]
    smask = km[:, None] & vm[None, :]
    state = tl.load(sptrs, mask=smask, other=0.0).to(tl.float32) * tl.exp(g)
    delta = (v - tl.sum(state * k[:, None], axis=0)) * beta  # [BLOCK_V]
    state += k[:, None] * delta[None, :]
    tl.store(sptrs, state.to(state_ptr.dtype.element_ty), mask=smask)
    o = tl.sum(state * q[:, None], axis=0)
    tl.store(o_ptr + s * so_s + h * so_h + vs, o.to(o_ptr.dtype.element_ty), mask=vm)


def gated_delta_step(q, k, v, g, beta, state, state_indices, scale: float) -> torch.Tensor:
    """``q, k [S, Hk, K]``, ``v [S, Hv, V]``, ``g, beta [S, Hv]``, ``state [slots, Hv, K, V]``
    (contiguous), ``state_indices [S]``; returns ``o [S, Hv, V]``."""
    S, H, V = v.shape
    K = q.shape[-1]
    o = torch.empty_like(v)
    if S == 0:
        return o
    q, k, v, g, beta = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, g, beta))
    if not state.is_contiguous():
        raise ValueError("gated_delta_step needs a contiguous state.")
    block_v = min(next_power_of_2(V), 32)
    fast_launch(_step_kernel)(  # (kernels/launch.py: no per-call binding on a hit)
        (S, H, cdiv(V, block_v)), (q, k, v, g, beta, state, state_indices, o),
        (float(scale), L2_EPS, H // q.shape[1], K, V, q.stride(0), q.stride(1), k.stride(0),
         k.stride(1), v.stride(0), v.stride(1), g.stride(0), beta.stride(0), state.stride(0),
         state.stride(1), state.stride(2), o.stride(0), o.stride(1)),
        {"BLOCK_K": next_power_of_2(K), "BLOCK_V": block_v})
    return o
