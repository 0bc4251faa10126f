"""The gated RMSNorm of the recurrent mixers' outputs in one Triton launch (``FusedOps.
gated_rms_norm`` of the Triton backends; the oracle and the three orders with their rounding
points: ``backends/reference/gated_norm.py``). Torch runs it as 4-7 kernels (casts, SiLU, the
products, ``F.rms_norm``) each reading and writing ``[T, C]`` float32 temporaries; here one
program per (row, group) reads y, z and the weight once and writes the output once.

The group's values stay in registers (``BLOCK`` = the group size rounded up to a power of two:
Mamba2-2.7B's one group of 5120 channels, Qwen3-Next's value heads of 128); groups past
``MAX_BLOCK`` channels run in tiles, the second pass reloading them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.host_ints import next_power_of_2
from tessellm.kernels.launch import FastLaunch

MAX_BLOCK = 8192  # channels of a group held at once (above: tiles, two passes)
# the reference's modes (``reference/gated_norm.GATED_NORM_MODES``), in the order of ``MODE``
# (this package imports no backend: a copy, which the kernel tests compare)
MODES = ("gate_then_norm", "norm_then_gate", "norm_round_then_gate", "gate_then_norm_float32")


@triton.jit
def _silu(z):
    return z / (1.0 + tl.exp(-z))


@triton.jit
def _gated_value(y, z, w, rstd, MODE: tl.constexpr, DT: tl.constexpr):
    """The output of one tile in float32 (``rstd`` of the group; y, z, w float32 holding values
    of their dtypes); the caller rounds it to y's dtype."""
    if MODE == 0:  # gate_then_norm: weight * round(y silu(z) rstd)
        return w * (y * _silu(z) * rstd).to(DT).to(tl.float32)
    elif MODE == 1:  # norm_then_gate: round(weight (y rstd) silu(z))
        return w * (y * rstd) * _silu(z)
    elif MODE == 2:  # norm_round_then_gate: round(silu(z) round(weight round(y rstd)))
        g = (w * (y * rstd).to(DT).to(tl.float32)).to(DT).to(tl.float32)
        return _silu(z) * g
    else:  # gate_then_norm_float32: round(weight (y silu(z) rstd))
        return w * (y * _silu(z) * rstd)


@triton.jit
def _gated_rms_norm_kernel(y_ptr, z_ptr, w_ptr, out_ptr, group_size, eps, sy, sz, so, w_group,
                           MODE: tl.constexpr, BLOCK: tl.constexpr, TILED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1).to(tl.int64) * group_size  # the group's first channel
    cols = tl.arange(0, BLOCK)
    y_row, z_row = y_ptr + row * sy + first, z_ptr + row * sz + first
    o_row = out_ptr + row * so + first
    w_row = w_ptr + tl.program_id(1) * w_group  # w_group: 0 when the groups share the weight
    if not TILED:
        m = cols < group_size
        y = tl.load(y_row + cols, mask=m, other=0.0).to(tl.float32)
        z = tl.load(z_row + cols, mask=m, other=0.0).to(tl.float32)
        v = y
        if MODE == 0 or MODE == 3:  # the gate before the norm
            v = y * _silu(z)
        rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / group_size + eps)
        w = tl.load(w_row + cols, mask=m, other=0.0).to(tl.float32)
        out = _gated_value(y, z, w, rstd, MODE, out_ptr.dtype.element_ty)
        tl.store(o_row + cols, out.to(out_ptr.dtype.element_ty), mask=m)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, group_size, BLOCK):
            m = c0 + cols < group_size
            y = tl.load(y_row + c0 + cols, mask=m, other=0.0).to(tl.float32)
            if MODE == 0 or MODE == 3:
                y = y * _silu(tl.load(z_row + c0 + cols, mask=m, other=0.0).to(tl.float32))
            acc += y * y
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / group_size + eps)
        for c0 in range(0, group_size, BLOCK):
            m = c0 + cols < group_size
            y = tl.load(y_row + c0 + cols, mask=m, other=0.0).to(tl.float32)
            z = tl.load(z_row + c0 + cols, mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_row + c0 + cols, mask=m, other=0.0).to(tl.float32)
            out = _gated_value(y, z, w, rstd, MODE, out_ptr.dtype.element_ty)
            tl.store(o_row + c0 + cols, out.to(out_ptr.dtype.element_ty), mask=m)


_gated_launch = FastLaunch(_gated_rms_norm_kernel)  # (kernels/launch.py: no binding on a hit)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, C]`` with a contiguous last dim (a view when its layout allows; ``t``
    itself when it is one: no op)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                   eps: float, mode: str = "gate_then_norm") -> torch.Tensor:
    """``backends/reference/gated_norm.gated_rms_norm`` in one launch: ``y, z [..., C]`` (z may
    be a column view: rows strided, the last dim contiguous), ``weight [C]`` or
    ``[group_size]``; returns a new tensor of y's shape and dtype."""
    channels = y.shape[-1]
    if mode not in MODES:
        raise ValueError(f"gated_rms_norm mode {mode!r} is not one of {MODES}.")
    if z.shape != y.shape or group_size <= 0 or channels % group_size:
        raise ValueError(f"gated_rms_norm: y {tuple(y.shape)} and z {tuple(z.shape)} must match "
                         f"and split into groups of {group_size} channels.")
    if weight.dim() != 1 or weight.shape[0] not in (channels, group_size):
        raise ValueError(f"gated_rms_norm: weight {tuple(weight.shape)} must be [{channels}] "
                         f"(per channel) or [{group_size}] (shared by the groups).")
    shape = y.shape
    y2, z2 = _rows(y), _rows(z)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    out = torch.empty(y2.shape, dtype=y.dtype, device=y.device)
    if y2.shape[0] == 0:
        return out if y.dim() == 2 else out.view(shape)
    block = min(MAX_BLOCK, next_power_of_2(group_size))
    _gated_launch((y2.shape[0], channels // group_size), (y2, z2, weight, out),
                  (group_size, eps, y2.stride(0), z2.stride(0), out.stride(0),
                   group_size if weight.shape[0] == channels else 0),
                  {"MODE": MODES.index(mode), "BLOCK": block, "TILED": block < group_size,
                   "num_warps": max(1, min(16, block // 256))})
    return out if y.dim() == 2 else out.view(shape)
