"""RoPE scaling of a GGUF file, as an HF ``rope_scaling`` dict.

llama.cpp's converter stores Llama 3.1/3.2's llama3 scaling not as metadata but as the tensor
``rope_freqs.weight``: one divisor per rotary frequency (1 for the high frequencies, ``factor``
for the low ones, a smooth ramp between), computed with ``low_freq_factor`` 1,
``high_freq_factor`` 4 and ``original_max_position_embeddings`` 8192 unless the HF config had
them at its top level. We recover ``factor`` (the largest divisor), recompute all of them with
those defaults and accept the file only when they agree. Linear scaling comes as metadata
(Gemma 3 4B-27B: factor 8 on the global layers). Anything else is refused by name.
"""

from __future__ import annotations

from typing import Optional

import torch

from tessellm.layers.rotary import inverse_frequencies

LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def gguf_rope_scaling(metadata: dict, arch: str, freq_factors: Optional[torch.Tensor],
                      head_dim: int, theta: float, path) -> Optional[dict]:
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear" and freq_factors is None:  # Gemma 3: its global layers
        return {"rope_type": "linear", "factor": float(metadata[f"{arch}.rope.scaling.factor"])}
    if kind != "none" or (freq_factors is not None and arch not in ("llama", "exaone")):
        what = f"rope.scaling.type {kind!r}" if kind != "none" else "rope_freqs.weight"
        raise ValueError(f"{path}: GGUF {what} in a {arch!r} file is not supported (llama's "
                         "rope_freqs.weight and linear scaling are); load a safetensors copy.")
    if freq_factors is None:
        return None
    return _llama3_from_factors(freq_factors.float().flatten(), head_dim, theta, path)


def llama3_factors(head_dim: int, theta: float, params: dict) -> torch.Tensor:
    """The divisors llama.cpp's converter writes for llama3 ``params``."""
    from tessellm.layers.rotary import _llama3_scaling

    inv_freq = inverse_frequencies(head_dim, theta, None)
    return inv_freq / _llama3_scaling(inv_freq, params)


def _llama3_from_factors(factors: torch.Tensor, head_dim: int, theta: float, path) -> dict:
    params = {"rope_type": "llama3", "factor": float(factors.max()), **LLAMA3_DEFAULTS}
    expected = llama3_factors(head_dim, theta, params)
    if factors.shape != expected.shape or not torch.allclose(factors, expected, rtol=1e-4, atol=0):
        raise ValueError(f"{path}: rope_freqs.weight holds RoPE frequency factors that are not "
                         f"Llama 3's (factor {params['factor']:g}, low_freq_factor 1, "
                         "high_freq_factor 4, original length 8192); load a safetensors copy.")
    return params
