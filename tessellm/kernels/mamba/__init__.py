"""Mamba2 mixer ops for the Triton backends (cuda, rocm): what ``TritonOps.mamba_*`` run.

The single-token state update (every decode step, every Mamba layer) is a Triton kernel
(``state_update.py``). The causal conv1d and the chunked SSD scan of prefill chunks run the
pure-torch reference (``backends/reference/mamba.py``) on the device for now: correct, a
host loop over the step's prefill sequences, not fast.
"""

from tessellm.backends.reference.mamba import causal_conv1d as mamba_conv1d
from tessellm.backends.reference.mamba import ssd_chunk_scan as mamba_chunk_scan
from tessellm.backends.reference.mamba import selective_state_update as mamba_state_update

__all__ = ["mamba_conv1d", "mamba_chunk_scan", "mamba_state_update"]
