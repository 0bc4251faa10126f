"""Mamba2 mixer ops in Triton for the Triton backends (cuda, rocm): what ``TritonOps.mamba_*``
run. ``conv1d.py``: the causal conv1d with per-request state (decodes and prefill chunks);
``state_update.py``: the single-token state update of decoding requests; ``chunk_scan.py``:
the chunked SSD scan of prefill chunks. Oracles: ``backends/reference/mamba.py``.
"""

from tessellm.kernels.mamba.chunk_scan import mamba_chunk_scan
from tessellm.kernels.mamba.conv1d import mamba_conv1d
from tessellm.kernels.mamba.state_update import mamba_state_update

__all__ = ["mamba_conv1d", "mamba_chunk_scan", "mamba_state_update"]
