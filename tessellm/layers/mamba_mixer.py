"""The Mamba2 mixer (HF's ``Mamba2Mixer`` / ``GraniteMoeHybridMambaLayer`` / ``BambaMixer``),
over flat tokens and the per-request state cache (``core/mamba_state.py``)::

    in_proj(h) -> [ z: I | xBC: I + 2GN | dt: H ]
    xBC = silu(causal_conv1d(xBC))             continues each request's conv state
    x, B, C = xBC -> [T, H, P], [T, G, N], [T, G, N]
    y = SSM(x, dt, A = -exp(A_log), B, C, D)   decodes: one state update; prefill chunks: the
                                              chunked SSD scan; both continue the SSM state
    out_proj(rmsnorm_gated(y, z))             per group of I / G channels: norm(y * silu(z))

The device ops come from the backend (``FusedOps.mamba_*``, declared by ``supports_mamba2``);
``I = expand * hidden`` (``H * P``), ``G`` groups share B and C, ``N`` is the state size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.layers.context import ModelContext
from tessellm.layers.linear import ColumnParallelLinear, RowParallelLinear


@dataclass(frozen=True)
class MambaShape:
    """A Mamba2 mixer's sizes, read from each family's config names."""

    hidden_size: int
    num_heads: int  # H
    head_dim: int  # P
    n_groups: int  # G
    d_state: int  # N
    d_conv: int  # the causal conv's kernel width
    chunk_size: int  # the SSD scan's chunk
    proj_bias: bool
    conv_bias: bool
    eps: float  # of the gated RMSNorm
    dt_limit: tuple[float, float]

    @property
    def intermediate(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate + 2 * self.n_groups * self.d_state


class MambaMixer2(nn.Module):
    def __init__(self, shape: MambaShape, ctx: ModelContext):
        super().__init__()
        if ctx.tp.size > 1:
            raise ValueError("Mamba layers do not run with tensor parallelism yet; use "
                             "tensor_parallel_size=1.")
        if not getattr(ctx.ops, "supports_mamba2", False):
            raise ValueError(f"This model has Mamba2 layers, whose ops the backend's fused ops "
                             f"{type(ctx.ops).__name__} do not provide (they do not declare "
                             "supports_mamba2, FusedOps' mamba_* ops); run it on a backend that "
                             "does (cpu, cuda, rocm).")
        self.shape = s = shape
        self.ops = ctx.ops
        self.in_proj = ColumnParallelLinear(s.hidden_size, [s.intermediate + s.conv_dim + s.num_heads],
                                            bias=s.proj_bias, quant_method=ctx.quant_method, tp=ctx.tp)
        self.conv1d = _Conv1dWeights(s.conv_dim, s.d_conv, s.conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(s.num_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(s.num_heads), requires_grad=False)
        self.D = nn.Parameter(torch.ones(s.num_heads), requires_grad=False)
        self.norm = _GatedNormWeight(s.intermediate)
        self.out_proj = RowParallelLinear(s.intermediate, s.hidden_size, bias=s.proj_bias,
                                          quant_method=ctx.quant_method, tp=ctx.tp)
        self.conv_state = self.ssm_state = None  # bound by the state cache
        self.step = None

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per slot: (conv state, SSM state) shapes."""
        s = self.shape
        return (s.conv_dim, s.d_conv - 1), (s.num_heads, s.head_dim, s.d_state)

    def bind(self, conv_state: torch.Tensor, ssm_state: torch.Tensor, step) -> None:
        """The state cache's tensors for this layer and the step holder it sets each step."""
        self.conv_state, self.ssm_state, self.step = conv_state, ssm_state, step

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        s, batch, t = self.shape, self.step.batch, hidden.shape[0]
        z, xbc, dt = self.in_proj(hidden).split([s.intermediate, s.conv_dim, s.num_heads], dim=-1)
        xbc = self.ops.mamba_conv1d(xbc.contiguous(), self.conv1d.weight[:, 0], self.conv1d.bias,
                                    self.conv_state, batch, "silu")
        x, B, C = xbc.split([s.intermediate, s.n_groups * s.d_state, s.n_groups * s.d_state], dim=-1)
        x = x.reshape(t, s.num_heads, s.head_dim)
        B = B.reshape(t, s.n_groups, s.d_state)
        C = C.reshape(t, s.n_groups, s.d_state)
        dt = dt.contiguous()
        A = -torch.exp(self.A_log.float())
        nd = batch.num_decodes
        parts = []
        if nd:
            parts.append(self.ops.mamba_state_update(
                x[:nd], dt[:nd], A, B[:nd], C[:nd], self.D, self.dt_bias, self.ssm_state,
                batch.state_indices[:nd], s.dt_limit))
        if batch.prefills is not None:
            parts.append(self.ops.mamba_chunk_scan(
                x[nd:], dt[nd:], A, B[nd:], C[nd:], self.D, self.dt_bias, self.ssm_state,
                batch.prefills, s.chunk_size, s.dt_limit))
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        y = gated_rms_norm(y.reshape(t, s.intermediate), z, self.norm.weight, s.n_groups, s.eps)
        return self.out_proj(y)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int,
                   eps: float) -> torch.Tensor:
    """HF's ``MambaRMSNormGated`` (norm after the gate): in float32 ``h = y * silu(z)``,
    RMS-normed over each of ``groups`` equal slices of the channels, rounded to y's dtype, times
    ``weight``."""
    h = y.float() * F.silu(z.float())
    g = h.reshape(*h.shape[:-1], groups, -1)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight * g.reshape(h.shape).to(y.dtype)


class _Conv1dWeights(nn.Module):
    """The checkpoint's ``conv1d.weight [C, 1, K]`` and ``conv1d.bias [C]`` (depthwise)."""

    def __init__(self, channels: int, width: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, width), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(channels), requires_grad=False) if bias else None


class _GatedNormWeight(nn.Module):
    """The checkpoint's ``norm.weight`` of the gated RMSNorm."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
