"""Bidirectional local attention (ModernBERT's local layers: a token sees the tokens at most
``half`` positions away, before and after it) on any backend's paged kernel with key limits,
without a kernel change.

The contract's sliding window bounds keys from below, relative to the row's position (keys
``> p - window``), and key limits bound them from above (keys ``<= limit``). So a layer built
with ``window = half + 1`` and each row's limit cut to ``p + half``::

    p = 5, half = 2, sequence 0..9:   keys 3 4 5 6 7
    window 3: keys > 2                limit min(9, 5 + 2) = 7

The step's key limits (``AttentionBatch.key_limits``: each sequence's last key, for an encoder)
are the global layers'; ``build_metadata`` gives the wrapped kernel a copy whose limits are cut
to ``position + half`` (rows without limits, e.g. the profile step's, stay causal).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


class SymmetricWindowKernel:
    """Wraps an ``AttentionKernel`` built with ``sliding_window = half + 1`` and
    ``prefill_key_limits``: its ``build_metadata`` sees the cut limits (module docstring), its
    ``forward`` runs as it is. Capabilities are the wrapped kernel's."""

    supports_sliding_window = True

    def __init__(self, kernel, half: int):
        self.kernel, self.half = kernel, half
        self.name = f"{getattr(kernel, 'name', type(kernel).__name__)}+symmetric({half})"
        for flag in ("fuses_rotary", "supports_key_limits"):
            setattr(self, flag, bool(getattr(kernel, flag, False)))
        self.supports_graph_capture = False  # the limits are cut on the host, per step

    def build_metadata(self, batch):
        return self.kernel.build_metadata(windowed_batch(batch, self.half))

    def forward(self, *args, **kwargs):
        return self.kernel.forward(*args, **kwargs)


def windowed_batch(batch, half: int):
    """``batch`` with each row's key limit cut to its position + ``half``."""
    limits = getattr(batch, "key_limits_host", None)
    if limits is None:
        return batch
    starts, lens = batch.query_start_loc_host, batch.seq_lens_host
    positions = np.asarray(limits, dtype=np.int64).copy()  # padding rows: as they are
    for s in range(len(lens)):
        first = lens[s] - (starts[s + 1] - starts[s])
        positions[starts[s]:starts[s + 1]] = np.arange(first, lens[s])
    cut = np.minimum(np.asarray(limits, dtype=np.int64), positions + half).astype(np.int32)
    return dataclasses.replace(batch, key_limits=torch.from_numpy(cut).to(batch.key_limits.device),
                               key_limits_host=cut.tolist())
