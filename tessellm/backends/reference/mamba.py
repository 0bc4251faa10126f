"""Mamba2 mixer ops in pure torch: the oracle for the conformance suite and the default every
backend may use (``FusedOps.mamba_*``, ``backends/spec.py``).

Tokens are flat over the step's sequences (no batch dim), as everywhere in tessellm; a
``MambaBatch`` says where each sequence starts and which state slot it reads and writes::

    tokens:          [ a0 | b0 | c0 c1 c2 c3 | d0 d1 ]     query_start_loc = [0, 1, 2, 6, 8]
    state slot:        5    0    3             1        state_indices   = [5, 0, 3, 1]
                     decodes   | prefill chunks          num_decodes = 2

Each sequence starts from the state in its slot (zeros for a fresh request: the engine zeroes
a slot before its first chunk) and leaves its final state there, so a prompt split over
several chunks (chunked prefill) runs as if it were one.

The SSM, per head ``h`` (``P`` head dims, ``N`` state dims, ``G`` groups of heads sharing B
and C), with ``dt = clamp(softplus(dt_raw + dt_bias), *dt_limit)`` and ``A < 0``::

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t (outer) B_t      [P, N]
    y_t     = state_t @ C_t + D * x_t                                    [P]

``selective_state_update`` is that recurrence for one token; ``ssd_chunk_scan`` computes the
same thing a chunk of ``Q`` tokens at a time (state space duality): inside a chunk the outputs
are a masked ``(C B^T) * decay`` product, and only chunk-end states go through the
recurrence. ``sequential_scan`` is the recurrence token by token: the tests' oracle for both.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tessellm.kernels.recurrent_pieces import save_conv_states


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  conv_state: torch.Tensor, batch, activation: Optional[str] = "silu",
                  snapshots: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise causal convolution of each sequence, continuing from its conv state.

    ``x [T, C]``, ``weight [C, K]``, ``bias [C]`` or None, ``conv_state [slots, C, K - 1]``:
    the K - 1 inputs before each sequence's first token (zeros for a fresh one). Returns
    ``[T, C]`` in x's dtype (``silu`` applied when ``activation`` is "silu"); each sequence's
    last K - 1 inputs (older state first when it is shorter) are written back to its slot.
    The decodes (one token each) are gathered and scattered by the device ``state_indices``,
    as a captured decode step needs (its host slot list is empty); prefills loop on the host.
    ``snapshots [S, C, K - 1]`` (``FusedOps.mamba_conv_state_saves``, plugin API 23): the conv
    state after each ``batch.state_saves`` offset goes to its slot (the K - 1 inputs before
    that token, ``state_saves.save_conv_states``), taken before the states are overwritten;
    without ``snapshots`` the saves are not this op's (the caller took them)."""
    if snapshots is not None and getattr(batch, "state_saves", None):
        save_conv_states(x, conv_state, batch, snapshots)
    out = torch.empty_like(x)
    nd = batch.num_decodes
    if nd:
        out[:nd] = _conv1d_decodes(x[:nd], weight, bias, conv_state, batch.state_indices[:nd], activation)
    qsl, slots = batch.query_start_loc_host, batch.state_indices_host
    for i in range(nd, len(slots)):
        slot = slots[i]
        lo, hi = qsl[i], qsl[i + 1]
        full = torch.cat([conv_state[slot].to(x.dtype), x[lo:hi].t()], dim=1)  # [C, K-1+L]
        y = F.conv1d(full[None], weight[:, None, :], bias, groups=x.shape[1])[0]  # [C, L]
        conv_state[slot] = full[:, full.shape[1] - conv_state.shape[2]:]
        out[lo:hi] = (F.silu(y) if activation == "silu" else y).t()
    return out


def _conv1d_decodes(x, weight, bias, conv_state, state_indices, activation) -> torch.Tensor:
    """One token per sequence: ``x [S, C]``, the window of each its slot's K - 1 inputs and
    its token; the window's last K - 1 inputs go back to the slot."""
    idx = state_indices.long()
    window = torch.cat([conv_state[idx].to(x.dtype), x[:, :, None]], dim=2)  # [S, C, K]
    y = (window * weight[None].to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias
    conv_state[idx] = window[:, :, 1:].to(conv_state.dtype)
    return F.silu(y) if activation == "silu" else y


def _discretized_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit) -> torch.Tensor:
    """``clamp(softplus(dt + dt_bias), *dt_limit)`` in float32."""
    dt = F.softplus(dt.float() + dt_bias.float())
    lo, hi = dt_limit
    return dt.clamp(min=lo, max=hi) if (lo > 0.0 or hi != float("inf")) else dt


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[..., G, N]`` -> ``[..., H, N]``: each group's B or C shared by its H / G heads."""
    return t.repeat_interleave(num_heads // t.shape[-2], dim=-2)


def selective_state_update(x, dt, A, B, C, D, dt_bias, ssm_state, state_indices,
                           dt_limit=(0.0, float("inf"))) -> torch.Tensor:
    """One token per sequence: ``x [S, H, P]``, ``dt [S, H]`` (raw), ``A, D, dt_bias [H]``,
    ``B, C [S, G, N]``, ``ssm_state [slots, H, P, N]``, ``state_indices`` int ``[S]``.
    Advances each sequence's state in its slot; returns ``y [S, H, P]`` in x's dtype."""
    idx = state_indices.long()
    dt = _discretized_dt(dt, dt_bias, dt_limit)  # [S, H]
    decay = torch.exp(dt * A.float())  # [S, H]
    b, c = _heads(B.float(), x.shape[1]), _heads(C.float(), x.shape[1])  # [S, H, N]
    state = ssm_state[idx].float() * decay[..., None, None]
    state = state + (dt[..., None] * x.float())[..., None] * b[:, :, None, :]
    ssm_state[idx] = state.to(ssm_state.dtype)
    y = torch.einsum("shpn,shn->shp", state, c) + D.float()[:, None] * x.float()
    return y.to(x.dtype)


def ssd_chunk_scan(x, dt, A, B, C, D, dt_bias, ssm_state, batch, chunk_size: int,
                   dt_limit=(0.0, float("inf"))) -> torch.Tensor:
    """Every sequence of ``batch``, chunk by chunk: ``x [T, H, P]``, ``dt [T, H]`` (raw),
    ``B, C [T, G, N]``, the rest as ``selective_state_update``. Reads and writes each
    sequence's state in its slot; returns ``y [T, H, P]`` in x's dtype."""
    out = torch.empty_like(x)
    dt = _discretized_dt(dt, dt_bias, dt_limit)
    qsl, slots = batch.query_start_loc_host, batch.state_indices_host
    for i, slot in enumerate(slots):
        lo, hi = qsl[i], qsl[i + 1]
        y, final = _ssd_one(x[lo:hi].float(), dt[lo:hi], A.float(), _heads(B[lo:hi].float(), x.shape[1]),
                            _heads(C[lo:hi].float(), x.shape[1]), ssm_state[slot].float(), chunk_size)
        out[lo:hi] = (y + D.float()[:, None] * x[lo:hi].float()).to(x.dtype)
        ssm_state[slot] = final.to(ssm_state.dtype)
    return out


def _ssd_one(x, dt, A, B, C, state, chunk: int):
    """One sequence, float32: ``x [L, H, P]``, ``dt [L, H]`` (discretized), ``B, C [L, H, N]``,
    ``state [H, P, N]`` (initial). Returns ``(y without D, final state)``.

    The sequence is padded to whole chunks with ``dt = 0`` (no decay, no input), so padding
    leaves the state alone. Per chunk, with ``a = cumsum(dt * A)`` over its positions::

        y_l  = sum_{s <= l} (C_l . B_s) exp(a_l - a_s) dt_s x_s      (inside the chunk)
             + exp(a_l) C_l . h_in                                  (the state coming in)
        h_out = exp(a_last) h_in + sum_s exp(a_last - a_s) dt_s x_s (outer) B_s
    """
    length = x.shape[0]
    pad = -length % chunk
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    n = x.shape[0] // chunk
    x, dt, B, C = (t.reshape(n, chunk, *t.shape[1:]) for t in (x, dt, B, C))
    a = torch.cumsum(dt * A, dim=1)  # [n, Q, H]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    seg = (a[:, :, None, :] - a[:, None, :, :]).masked_fill(~causal[None, :, :, None], float("-inf"))
    scores = torch.einsum("clhn,cshn->clsh", C, B) * torch.exp(seg)  # [n, Q(l), Q(s), H]
    xdt = x * dt[..., None]  # [n, Q, H, P]
    y = torch.einsum("clsh,cshp->clhp", scores, xdt)
    to_end = torch.exp(a[:, -1:, :] - a)  # [n, Q, H]
    chunk_states = torch.einsum("clhn,clhp->chpn", B * to_end[..., None], xdt)
    starts = []
    for c in range(n):  # the recurrence over chunk ends
        starts.append(state)
        state = torch.exp(a[c, -1])[:, None, None] * state + chunk_states[c]
    h_in = torch.stack(starts)  # [n, H, P, N]
    y = y + torch.einsum("clhn,chpn->clhp", C, h_in) * torch.exp(a)[..., None]
    return y.reshape(n * chunk, *y.shape[2:])[:length], state


def sequential_scan(x, dt, A, B, C, D, dt_bias, state, dt_limit=(0.0, float("inf"))):
    """The recurrence token by token for one sequence (``x [L, H, P]``, ``state [H, P, N]``,
    float32, not modified): ``(y [L, H, P], final state)``. The oracle of the tests."""
    ys, slot = [], state.clone()[None]
    idx = torch.zeros(1, dtype=torch.long, device=x.device)
    for t in range(x.shape[0]):
        ys.append(selective_state_update(x[t:t + 1], dt[t:t + 1], A, B[t:t + 1], C[t:t + 1], D,
                                         dt_bias, slot, idx, dt_limit))
    return torch.cat(ys), slot[0]
