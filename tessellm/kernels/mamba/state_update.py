"""The Mamba2 single-token state update in Triton (``FusedOps.mamba_state_update``; the oracle
is ``backends/reference/mamba.selective_state_update``), run by every Mamba layer for every
decoding request each step.

One program per (sequence, head, block of head dims); it owns those rows of the state::

    state[slot, h, p, :]  (BLOCK_P rows x N)      dt = clamp(softplus(dt_raw + dt_bias[h]))
    state = exp(dt * A[h]) * state + (dt * x[p]) * B[g]        g = h // (H / G)
    y[p]  = state[p, :] . C[g] + D[h] * x[p]

The state is read and written in place at ``state_indices[s]``; arithmetic in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.host_ints import cdiv, next_power_of_2
from tessellm.kernels.launch import fast_launch


@triton.jit
def _state_update_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dt_bias_ptr, state_ptr,
                         idx_ptr, y_ptr, heads_per_group, P, N, dt_lo, dt_hi,
                         sx_s, sx_h, sdt_s, sb_s, sb_g, sc_s, sc_g, ss_slot, ss_h, ss_p, sy_s, sy_h,
                         CLAMP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    pm, nm = ps < P, ns < N
    g = h // heads_per_group
    slot = tl.load(idx_ptr + s).to(tl.int64)

    dt = tl.load(dt_ptr + s * sdt_s + h).to(tl.float32) + tl.load(dt_bias_ptr + h).to(tl.float32)
    dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))  # torch's softplus
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    decay = tl.exp(dt * tl.load(a_ptr + h).to(tl.float32))

    x = tl.load(x_ptr + s * sx_s + h * sx_h + ps, mask=pm, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + s * sb_s + g * sb_g + ns, mask=nm, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + s * sc_s + g * sc_g + ns, mask=nm, other=0.0).to(tl.float32)
    sptrs = state_ptr + slot * ss_slot + h * ss_h + ps[:, None] * ss_p + ns[None, :]
    smask = pm[:, None] & nm[None, :]
    state = tl.load(sptrs, mask=smask, other=0.0).to(tl.float32)
    state = state * decay + (dt * x)[:, None] * b[None, :]
    tl.store(sptrs, state.to(state_ptr.dtype.element_ty), mask=smask)
    y = tl.sum(state * c[None, :], axis=1) + tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + s * sy_s + h * sy_h + ps, y.to(y_ptr.dtype.element_ty), mask=pm)


def mamba_state_update(x, dt, A, B, C, D, dt_bias, ssm_state, state_indices,
                       dt_limit=(0.0, float("inf"))) -> torch.Tensor:
    """``x [S, H, P]``, ``dt [S, H]``, ``A, D, dt_bias [H]``, ``B, C [S, G, N]``, ``ssm_state
    [slots, H, P, N]`` (contiguous), ``state_indices [S]``; returns ``y [S, H, P]``."""
    S, H, P = x.shape
    N = ssm_state.shape[-1]
    y = torch.empty_like(x)
    if S == 0:
        return y
    x, dt, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dt, B, C))
    if not ssm_state.is_contiguous():
        raise ValueError("mamba_state_update needs a contiguous ssm_state.")
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    block_p = min(next_power_of_2(P), 32)
    fast_launch(_state_update_kernel)(  # (kernels/launch.py: no per-call binding on a hit)
        (S, H, cdiv(P, block_p)),
        (x, dt, A, B, C, D, dt_bias, ssm_state, state_indices, y),
        (H // B.shape[1], P, N, lo, hi if hi != float("inf") else 3.0e38, x.stride(0),
         x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
         ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0), y.stride(1)),
        {"CLAMP": lo > 0.0 or hi != float("inf"), "BLOCK_P": block_p,
         "BLOCK_N": next_power_of_2(N)})
    return y
