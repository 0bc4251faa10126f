"""The gated delta rule (gated DeltaNet linear attention: Qwen3-Next) in pure torch: the oracle
for the conformance suite and the default every backend may use (``FusedOps.gated_delta_*``,
``backends/spec.py``).

Tokens are flat over the step's sequences and a ``MambaBatch`` says where each starts and which
slot of the recurrent-state cache it reads and writes, as for the Mamba2 ops
(``reference/mamba.py``). Per value head ``h`` (its key head is ``h // (Hv / Hk)``), with ``q``
and ``k`` L2-normalized (``x * rsqrt(sum(x^2) + 1e-6)``, float32), ``q`` times ``scale``,
``g_t <= 0`` the log decay and ``beta_t`` in (0, 1) the write strength::

    S_t = exp(g_t) S_{t-1}                              state [K, V]
    S_t = S_t + k_t (outer) beta_t (v_t - S_t^T k_t)     the delta rule: replace what k_t reads
    o_t = S_t^T q_t                                      [V]

``gated_delta_step`` is that recurrence for one token per sequence (decodes);
``gated_delta_chunk`` computes the same thing ``chunk`` tokens at a time (prefill chunks):
inside a chunk, with ``a = cumsum(g)`` and ``D[i, j] = exp(a_i - a_j)`` for ``j <= i``::

    A   = strict_lower(beta_i (k_i . k_j) D[i, j])           [Q, Q]
    u   = (I + A)^-1 (beta v)          w = (I + A)^-1 (beta k exp(a))     (the WY form)
    v'  = u - w S_in                     what each token writes, net of the state coming in
    o   = (q exp(a)) S_in + ((q k^T) * D) v'
    S_out = exp(a_last) S_in + (k exp(a_last - a))^T v'

``sequential_gated_delta`` is the recurrence token by token: the tests' oracle for both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2_EPS = 1e-6  # of the in-op L2 normalization of q and k (fla's and HF's)
CHUNK = 64  # the reference's own chunk; any chunk gives the same function of the inputs


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x * rsqrt(sum(x^2, -1) + 1e-6)`` in float32."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def _to_value_heads(t: torch.Tensor, num_value_heads: int) -> torch.Tensor:
    """``[..., Hk, K]`` -> ``[..., Hv, K]``: key head ``j`` serves value heads
    ``j * Hv / Hk ... (j + 1) * Hv / Hk - 1``."""
    return t.repeat_interleave(num_value_heads // t.shape[-2], dim=-2)


def gated_delta_step(q, k, v, g, beta, state, state_indices, scale: float) -> torch.Tensor:
    """One token per sequence: ``q, k [S, Hk, K]`` (raw), ``v [S, Hv, V]``, ``g, beta [S, Hv]``,
    ``state [slots, Hv, K, V]``, ``state_indices`` int ``[S]``. Advances each sequence's state in
    its slot; returns ``o [S, Hv, V]`` in v's dtype."""
    idx = state_indices.long()
    heads = v.shape[1]
    q = _to_value_heads(l2_normalize(q), heads) * scale
    k = _to_value_heads(l2_normalize(k), heads)
    s = state[idx].float() * torch.exp(g.float())[..., None, None]  # [S, Hv, K, V]
    delta = (v.float() - torch.einsum("shkv,shk->shv", s, k)) * beta.float()[..., None]
    s = s + k[..., :, None] * delta[..., None, :]
    state[idx] = s.to(state.dtype)
    return torch.einsum("shkv,shk->shv", s, q).to(v.dtype)


def gated_delta_chunk(q, k, v, g, beta, state, batch, scale: float,
                      chunk: int = CHUNK) -> torch.Tensor:
    """Every sequence of ``batch`` (a ``MambaBatch``), ``chunk`` tokens at a time: ``q, k
    [T, Hk, K]``, ``v [T, Hv, V]``, ``g, beta [T, Hv]``, the rest as ``gated_delta_step``.
    Reads and writes each sequence's state in its slot; returns ``o [T, Hv, V]``."""
    out = torch.empty_like(v)
    heads = v.shape[1]
    q = _to_value_heads(l2_normalize(q), heads) * scale
    k = _to_value_heads(l2_normalize(k), heads)
    qsl, slots = batch.query_start_loc_host, batch.state_indices_host
    for i, slot in enumerate(slots):
        lo, hi = qsl[i], qsl[i + 1]
        o, final = _chunked_one(q[lo:hi], k[lo:hi], v[lo:hi].float(), g[lo:hi].float(),
                                beta[lo:hi].float(), state[slot].float(), chunk)
        out[lo:hi] = o.to(v.dtype)
        state[slot] = final.to(state.dtype)
    return out


def _chunked_one(q, k, v, g, beta, s, chunk: int):
    """One sequence in float32, heads first inside: ``q, k [L, H, K]`` (normalized, q scaled),
    ``v [L, H, V]``, ``g, beta [L, H]``, ``s [H, K, V]``. Returns ``(o [L, H, V], final s)``.
    The sequence is padded to whole chunks with ``g = beta = 0`` and zero k, v: padding
    neither decays nor writes the state."""
    length = q.shape[0]
    pad = -length % chunk
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)).transpose(0, 1) for t in (q, k, v))  # [H, L', *]
    g, beta = (F.pad(t, (0, 0, 0, pad)).t() for t in (g, beta))  # [H, L']
    n = q.shape[1] // chunk
    q, k, v = (t.reshape(t.shape[0], n, chunk, t.shape[-1]) for t in (q, k, v))
    g, beta = (t.reshape(t.shape[0], n, chunk) for t in (g, beta))
    a = g.cumsum(-1)  # [H, n, Q]
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (a[..., :, None] - a[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    kb = k * beta[..., None]
    unit = torch.eye(chunk, dtype=q.dtype, device=q.device)
    system = unit + ((kb @ k.transpose(-1, -2)) * decay).tril(-1)  # I + A
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, kb * a.exp()[..., None], upper=False,
                                      unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay  # [H, n, Q, Q], causal
    q_in = q * a.exp()[..., None]  # reads of the state coming in
    k_out = k * (a[..., -1:] - a).exp()[..., None]  # writes, decayed to the chunk's end
    outs = []
    for c in range(n):
        v_net = u[:, c] - w[:, c] @ s
        outs.append(q_in[:, c] @ s + attn[:, c] @ v_net)
        s = s * a[:, c, -1].exp()[:, None, None] + k_out[:, c].transpose(-1, -2) @ v_net
    o = torch.stack(outs, dim=1).reshape(q.shape[0], n * chunk, -1)[:, :length]
    return o.transpose(0, 1), s


def sequential_gated_delta(q, k, v, g, beta, state, scale: float):
    """The recurrence token by token for one sequence (``q, k [L, Hk, K]``, ``v [L, Hv, V]``,
    ``state [Hv, K, V]``, float32, not modified): ``(o [L, Hv, V], final state)``. The oracle of
    the tests."""
    outs, slot = [], state.clone()[None]
    idx = torch.zeros(1, dtype=torch.long, device=q.device)
    for t in range(q.shape[0]):
        outs.append(gated_delta_step(q[t:t + 1], k[t:t + 1], v[t:t + 1], g[t:t + 1],
                                     beta[t:t + 1], slot, idx, scale))
    return torch.cat(outs), slot[0]
