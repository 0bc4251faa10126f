"""Mamba2 mixer ops in Triton for the Triton backends (cuda, rocm): what ``TritonOps.mamba_*``
run. ``conv1d.py``: the causal conv1d with per-request state (decodes and prefill chunks);
``state_update.py``: the single-token state update of decoding requests; ``chunk_scan.py``:
the scan of prefill chunks (``ssd.py``: chunked SSD in parallel kernels; the sequential kernel
where their scratch would not fit); ``verify.py``: the conv and the state update over the
tokens of speculative decoding's verify sequences, one launch each, keeping the state after
every token. Oracles: ``backends/reference/mamba.py``, ``backends/reference/recurrent_verify.py``.
"""

from tessellm.kernels.mamba.chunk_scan import mamba_chunk_scan
from tessellm.kernels.mamba.conv1d import mamba_conv1d
from tessellm.kernels.mamba.state_update import mamba_state_update
from tessellm.kernels.mamba.verify import mamba_conv1d_verify, mamba_state_update_verify

__all__ = ["mamba_conv1d", "mamba_chunk_scan", "mamba_state_update", "mamba_conv1d_verify",
           "mamba_state_update_verify"]
