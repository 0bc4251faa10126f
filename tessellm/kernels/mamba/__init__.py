"""Mamba2 mixer ops for the Triton backends (cuda, rocm): what ``TritonOps.mamba_*`` run.

In Triton: the causal conv1d with its per-request state (``conv1d.py``, decodes and prefill
chunks) and the single-token state update of decoding requests (``state_update.py``). The
chunked SSD scan of prefill chunks runs the pure-torch reference
(``backends/reference/mamba.ssd_chunk_scan``) on the device: correct, a host loop over the
step's prefill sequences, not fast.
"""

from tessellm.backends.reference.mamba import ssd_chunk_scan as mamba_chunk_scan
from tessellm.kernels.mamba.conv1d import mamba_conv1d
from tessellm.kernels.mamba.state_update import mamba_state_update

__all__ = ["mamba_conv1d", "mamba_chunk_scan", "mamba_state_update"]
