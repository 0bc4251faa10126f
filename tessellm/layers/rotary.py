"""Rotary position embedding (NeoX style), with llama3 frequency scaling."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn


def inverse_frequencies(head_size: int, base: float, scaling: Optional[dict]) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: default, linear, llama3.")


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


def _longrope_cache(head_size: int, max_position: int, base: float, s: dict) -> torch.Tensor:
    """LongRoPE (Phi-3 "su"/"longrope"): per-frequency divisors, ``short_factor`` for positions
    below ``original_max_position_embeddings`` and ``long_factor`` from there on, cos and sin
    scaled by ``attention_factor`` (default sqrt(1 + ln(max / original) / ln(original))).
    HF switches the whole sequence to the long factors once it outgrows the original length;
    here each position keeps its own (as vLLM does), so the two agree below that length."""
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_position / original
    scale = s.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size
    parts = []
    for key, lo, hi in (("short_factor", 0, min(original, max_position)),
                        ("long_factor", original, max_position)):
        if hi <= lo:
            continue
        inv_freq = 1.0 / (torch.tensor(s[key], dtype=torch.float32) * base ** shape)
        freqs = torch.outer(torch.arange(lo, hi, dtype=torch.float32), inv_freq)
        parts.append(torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1))
    return torch.cat(parts)


class RotaryEmbedding(nn.Module):
    """Holds a ``[max_position, head_size]`` float32 cache: cos in the first half, sin after."""

    # NeoX style (rotate the two halves of each head) over the whole head: the rotation an
    # attention kernel that declares ``fuses_rotary`` can apply from ``cos_sin_cache``.
    is_neox_style = True

    def __init__(self, head_size: int, max_position: int, base: float, scaling: Optional[dict], ops):
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = head_size  # dimensions rotated per head (partial rotary: fewer)
        self.ops = ops
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
        if kind in ("longrope", "su"):
            cache = _longrope_cache(head_size, max_position, base, scaling)
        else:
            inv_freq = inverse_frequencies(head_size, base, scaling)
            freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
            cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions, q, k):
        return self.ops.rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_size)
