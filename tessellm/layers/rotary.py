"""Rotary position embedding (NeoX style): the cos/sin cache of every scaling type HF
transformers defines for the families we serve, built once per model.

``RotaryEmbedding`` holds ``cos_sin_cache`` ``[rows, rotary_dim]`` (cos of the
``rotary_dim / 2`` frequencies, then sin), already multiplied by the type's attention factor
(yarn, longrope), so the backend's ``rotary_embedding`` op only looks rows up. ``rows`` is the
model's length (``rope_max_positions``) cut to the positions the engine can rotate
(``ModelContext.max_positions``: Llama 4 Scout's 10M positions would be 5 GB of float32); a
kept row is the same as in the uncut table (the type's settings still see the model's
length, e.g. longrope's default factor). The settings
come as one flat dict (``layers.rope_config.rope_parameters`` reads them from an HF config)::

    rope_type   inverse frequencies (d = rotary_dim, i = 0, 2, .., d - 2)
    default     theta ** (-i / d)
    linear      default / factor
    dynamic     default: HF rescales only past max_position_embeddings, which max_model_len
                never exceeds
    llama3      low frequencies / factor, high ones kept, a smooth ramp between (Llama 3.1)
    yarn        interpolated (/ factor) below the correction range, extrapolated above it,
                linear ramp within; cos/sin times attention_factor (0.1 ln(factor) + 1)
    longrope    theta ** (-i / d) / short_factor[i] at positions < original_max_position_embeddings,
    (su)        / long_factor[i] from there on; cos/sin times attention_factor, or times
                short_mscale / long_mscale where the config sets them (Phi-3.5-MoE)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "su")


def rope_type(scaling: Optional[dict]) -> str:
    scaling = scaling or {}
    return scaling.get("rope_type") or scaling.get("type") or "default"


def check_rope_type(scaling: Optional[dict], where: str = "rope_parameters") -> None:
    """Refuses a scaling type we do not implement (one sentence naming the field and value)."""
    kind = rope_type(scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"The model's {where} rope_type {kind!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}.")


def inverse_frequencies(head_size: int, base: float, scaling: Optional[dict]) -> torch.Tensor:
    """Inverse frequencies of the ``head_size`` rotated dims (a partial rotary passes its
    rotary dim); longrope's depend on the position and are built by ``_longrope_cache``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
    check_rope_type(scaling)
    kind = rope_type(scaling)
    if kind in ("default", "dynamic"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    if kind == "yarn":
        return _yarn_inverse_frequencies(head_size, base, scaling)
    raise ValueError(f"rope_type {kind!r} has position-dependent frequencies; use RotaryEmbedding.")


def _llama3_scaling(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_factor(s: dict) -> float:
    factor = s.get("factor")
    if factor is None:  # HF: the ratio of the extended to the pretraining length
        factor = s["max_position_embeddings"] / s["original_max_position_embeddings"]
    return float(factor)


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's magnitude scale (HF's ``yarn_get_mscale``): ``0.1 m ln(factor) + 1``, 1 when
    ``factor`` <= 1."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def yarn_attention_factor(s: dict) -> float:
    """cos/sin multiplier: ``attention_factor``, else ``mscale(factor, mscale) /
    mscale(factor, mscale_all_dim)`` when both are set, else ``0.1 ln(factor) + 1``."""
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    factor = _yarn_factor(s)
    if s.get("mscale") and s.get("mscale_all_dim"):
        return float(yarn_mscale(factor, s["mscale"]) / yarn_mscale(factor, s["mscale_all_dim"]))
    return yarn_mscale(factor)


def _yarn_inverse_frequencies(dim: int, base: float, s: dict) -> torch.Tensor:
    """YaRN "NTK-by-parts": dims that turn fewer than ``beta_slow`` times over the pretraining
    length are interpolated, more than ``beta_fast`` times extrapolated, a ramp between."""
    factor = _yarn_factor(s)
    original = s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def _longrope_cache(rotary_dim: int, max_position: int, base: float, s: dict,
                    rows: int) -> torch.Tensor:
    """LongRoPE (Phi-3 "su"/"longrope"): per-frequency divisors, ``short_factor`` for positions
    below ``original_max_position_embeddings`` and ``long_factor`` from there on, cos and sin
    scaled by ``attention_factor`` (default sqrt(1 + ln(max / original) / ln(original))).

    HF picks the factors per forward pass: long for all of it once its last position reaches
    the original length. For a prompt no longer than that and the tokens decoded after it
    (crossing it included) that is exactly the per-position choice made here; only a prompt
    longer than the original length differs (HF rotates its first positions with the long
    factors too)."""
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_position / original
    scale = s.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    for key in ("short_factor", "long_factor"):
        if len(s[key]) != rotary_dim // 2:
            raise ValueError(f"rope_parameters {key} has {len(s[key])} values; the rotary "
                             f"dimension {rotary_dim} needs {rotary_dim // 2}.")
    shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    parts = []
    for key, lo, hi in (("short_factor", 0, min(original, rows)),
                        ("long_factor", original, rows)):
        if hi <= lo:
            continue
        inv_freq = 1.0 / (torch.tensor(s[key], dtype=torch.float32) * base ** shape)
        freqs = torch.outer(torch.arange(lo, hi, dtype=torch.float32), inv_freq)
        mscale = s.get(key.replace("_factor", "_mscale"))  # Phi-3.5-MoE: its own per range
        part_scale = scale if mscale is None else float(mscale)
        parts.append(torch.cat((freqs.cos() * part_scale, freqs.sin() * part_scale), dim=-1))
    return torch.cat(parts)


def cos_sin_cache(rotary_dim: int, max_position: int, base: float, scaling: Optional[dict],
                  rows: Optional[int] = None) -> torch.Tensor:
    """float32 ``[rows, rotary_dim]``: cos then sin, times the attention factor, for the first
    ``rows`` (default ``max_position``) positions of a model of ``max_position`` positions."""
    check_rope_type(scaling)
    kind = rope_type(scaling)
    rows = max_position if rows is None else min(rows, max_position)
    if kind in ("longrope", "su"):
        return _longrope_cache(rotary_dim, max_position, base, scaling, rows)
    inv_freq = inverse_frequencies(rotary_dim, base, scaling)
    freqs = torch.outer(torch.arange(rows, dtype=torch.float32), inv_freq)
    scale = yarn_attention_factor(scaling) if kind == "yarn" else 1.0
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    return cache if scale == 1.0 else cache * scale


class RotaryEmbedding(nn.Module):
    """Holds a ``[rows, rotary_dim]`` float32 cache: cos in the first half, sin after.
    ``rotary_dim`` < ``head_size`` (partial rotary): the rest of each head passes unrotated.
    ``max_positions`` (``ModelContext.max_positions``; None: no cut): the positions the engine
    can rotate; ``rows`` is the smaller of it and the model's ``max_position``."""

    # NeoX style (rotate the two halves of the rotated part): the rotation an attention kernel
    # that declares ``fuses_rotary`` can apply from ``cos_sin_cache`` (whole heads only).
    is_neox_style = True

    def __init__(self, head_size: int, max_position: int, base: float, scaling: Optional[dict],
                 ops, rotary_dim: Optional[int] = None, max_positions: Optional[int] = None):
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim or head_size
        if self.rotary_dim % 2 or self.rotary_dim > head_size:
            raise ValueError(f"Rotary dimension {self.rotary_dim} must be even and at most the "
                             f"head size {head_size} (check partial_rotary_factor).")
        self.ops = ops
        cache = cos_sin_cache(self.rotary_dim, max_position, base, scaling, rows=max_positions)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    @classmethod
    def from_config(cls, config, head_size: int, ops, layer_type: Optional[str] = None,
                    params: Optional[dict] = None,
                    max_positions: Optional[int] = None) -> "RotaryEmbedding":
        """From an HF config (``params``: settings read already, e.g. Gemma 3's per layer;
        ``max_positions``: ``ModelContext.max_positions``)."""
        from tessellm.layers.rope_config import rope_max_positions, rope_parameters

        params = params if params is not None else rope_parameters(config, layer_type)
        rotary_dim = int(head_size * params.get("partial_rotary_factor", 1.0))
        return cls(head_size, rope_max_positions(config), params["rope_theta"], params, ops,
                   rotary_dim=rotary_dim, max_positions=max_positions)

    def forward(self, positions, q, k):
        return self.ops.rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_size)
