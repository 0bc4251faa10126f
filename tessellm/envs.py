"""Every environment variable tessellm reads, read here and nowhere else."""

from __future__ import annotations

import os
from typing import Optional


def plugins_allowed() -> Optional[set[str]]:
    """TESSELLM_PLUGINS: comma-separated backend plugin names to load; unset loads all."""
    value = os.environ.get("TESSELLM_PLUGINS")
    if value is None or not value.strip():
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def api_key() -> Optional[str]:
    """TESSELLM_API_KEY: the server's API key when --api-key is not given."""
    return os.environ.get("TESSELLM_API_KEY") or None


def cpu_kv_cache_bytes() -> Optional[int]:
    """TESSELLM_CPU_KV_CACHE_GB: KV cache size for the cpu backend, in GiB."""
    value = os.environ.get("TESSELLM_CPU_KV_CACHE_GB")
    return int(float(value) * (1 << 30)) if value else None


def cpu_compile() -> Optional[bool]:
    """TESSELLM_CPU_COMPILE: "1" compiles the cpu backend's decode step with ``torch.compile``,
    "0" keeps it eager. Unset: None, the cpu plugin's default (eager; docs/plugins.md)."""
    value = os.environ.get("TESSELLM_CPU_COMPILE", "").strip().lower()
    if not value:
        return None
    if value in ("0", "off", "false", "no"):
        return False
    if value in ("1", "on", "true", "yes"):
        return True
    raise ValueError(f"TESSELLM_CPU_COMPILE={value!r} is not understood; use 1 or 0.")


def cuda_pdl() -> bool:
    """TESSELLM_PDL: "1" turns on programmatic dependent launch of the cuda backend's captured
    decode kernels (``backends/cuda/pdl.py``; opt-in until validated on a GPU in its final form)."""
    value = os.environ.get("TESSELLM_PDL", "0").strip().lower()
    if value in ("0", "off", "false", "no"):
        return False
    if value in ("1", "on", "true", "yes"):
        return True
    raise ValueError(f"TESSELLM_PDL={value!r} is not understood; use 1 or 0.")


def engine_process_env_defaults() -> dict[str, str]:
    """Set for the engine-core process unless the user set them: OpenMP threads that spin while
    idle steal the cores the API process needs (measured on 2 cores: 7x slower steps)."""
    return {"OMP_WAIT_POLICY": "PASSIVE"}
