"""The gated RMSNorm of the recurrent mixers' outputs (the oracle of the optional
``FusedOps.gated_rms_norm``; the layers run it where the backend has none, the cpu backend
included): ``y [T, C]`` normed per group of ``group_size`` channels and gated by ``z [T, C]``
(``silu(z)``), in one of the orders of HF's modules, each with its own rounding points
(float32 throughout unless said; ``round``: to y's dtype)::

    "gate_then_norm"   Mamba2 / Granite 4.0-H / Bamba / Nemotron-H (``Mamba2RMSNormGated``):
                       h = y * silu(z);  out = weight * round(h * rstd(h))
    "gate_then_norm_float32"  Falcon-H1 without ``mamba_norm_before_gate``
                       (``FalconH1RMSNormGated``): out = round(weight * (h * rstd(h)))
    "norm_then_gate"   Falcon-H1 with ``mamba_norm_before_gate`` (``FalconH1RMSNormGated``):
                       out = round(weight * (y * rstd(y)) * silu(z))
    "norm_round_then_gate"  Qwen3-Next's gated DeltaNet (``Qwen3NextRMSNormGated``):
                       out = round(silu(z) * round(weight * round(y * rstd(y))))

with ``rstd(v) = rsqrt(mean(v^2 over the group) + eps)``. ``weight`` is ``[C]`` (a weight per
channel: the Mamba mixers) or ``[group_size]`` (one weight shared by every group: Qwen3-Next's
value heads), in y's dtype; a product with it is rounded to y's dtype where both are 16-bit
(``weight * round(...)``: torch's rounding of a 16-bit product). The output is y's shape and
dtype. ``z`` may be a column view (its rows strided, the last dim contiguous)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GATED_NORM_MODES = ("gate_then_norm", "norm_then_gate", "norm_round_then_gate",
                    "gate_then_norm_float32")


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                   eps: float, mode: str = "gate_then_norm") -> torch.Tensor:
    """See the module docstring. Torch ops: the gate's product promotes y inside one kernel and
    the group norm is one ``F.rms_norm`` (one fused kernel where torch has one, e.g. CUDA)."""
    check_gated_norm(y, z, weight, group_size, mode)
    shape = y.shape
    grouped = (*shape[:-1], shape[-1] // group_size, group_size)

    def times_weight(t: torch.Tensor) -> torch.Tensor:  # per channel, or shared by the groups
        if weight.shape[-1] == shape[-1]:
            return weight * t.reshape(shape)
        return (weight * t.reshape(grouped)).reshape(shape)

    if mode.startswith("gate_then_norm"):
        h = (F.silu(z.float()) * y).reshape(grouped)
        g = F.rms_norm(h, (group_size,), eps=eps)
        if mode == "gate_then_norm_float32":
            return times_weight(g).to(y.dtype)
        return times_weight(g.to(y.dtype))
    g = F.rms_norm(y.float().reshape(grouped), (group_size,), eps=eps)
    if mode == "norm_then_gate":
        return (times_weight(g) * F.silu(z.float())).to(y.dtype)
    return (F.silu(z.float()) * times_weight(g.to(y.dtype))).to(y.dtype)  # norm_round_then_gate


def check_gated_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                     mode: str) -> None:
    """One clear error for arguments outside the contract (a caller's mistake, not data)."""
    if mode not in GATED_NORM_MODES:
        raise ValueError(f"gated_rms_norm mode {mode!r} is not one of {GATED_NORM_MODES}.")
    channels = y.shape[-1]
    if z.shape != y.shape or group_size <= 0 or channels % group_size:
        raise ValueError(f"gated_rms_norm: y {tuple(y.shape)} and z {tuple(z.shape)} must match "
                         f"and split into groups of {group_size} channels.")
    if weight.dim() != 1 or weight.shape[0] not in (channels, group_size):
        raise ValueError(f"gated_rms_norm: weight {tuple(weight.shape)} must be [{channels}] "
                         f"(per channel) or [{group_size}] (shared by the groups).")
