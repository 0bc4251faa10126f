"""A tensor derived from a weight (``-exp(A_log)`` in float32, a float32 copy of a bias) that a
layer would otherwise remake in every step: made once, and again only when the weight changes
in place (its version counter moves: the engine marks every weight after a weight update or a
wake-up, ``core/runner_sleep.mark_weights_changed``; the cpu backend's packed weights follow
the same rule).

Made afresh, not kept, where a kept tensor could go stale or the version cannot be read:
inside a device graph capture (CUDA / ROCm or XPU graphs: a replay after a weight update must
read the weight itself, as no Python runs to notice the change, and a kept tensor replaced
after the capture would be freed under the graph), under ``torch.compile``, for
inference-mode weights (they have no version counter), and on devices that trace each step into
a program (torch-xla's ``xla``, torch's ``lazy``): there the first step would trace the
derivation and later ones would read the kept result as an input, two different programs for
one step shape (the bucket compiled at start-up compiled again when next served, and again
after each weight update); made afresh, the derivation is one fused elementwise op of the same
program every step. (Reading ``_version`` is host-only: no device sync either way.)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# Device types whose ops are recorded into a graph program rather than run (module docstring).
TRACED_DEVICE_TYPES = ("xla", "lazy")


class DerivedWeight:
    """``derived(weight)``: ``make(weight)``, kept per (weight, version)."""

    def __init__(self, make: Callable[[torch.Tensor], torch.Tensor]):
        self.make = make
        self.entry: Optional[tuple[torch.Tensor, int, torch.Tensor]] = None

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if (torch.compiler.is_compiling() or weight.is_inference()
                or weight.device.type in TRACED_DEVICE_TYPES or _capturing(weight.device)):
            return self.make(weight)
        version = weight._version
        entry = self.entry
        if entry is None or entry[0] is not weight or entry[1] != version:
            entry = self.entry = (weight, version, self.make(weight))
        return entry[2]


def _capturing(device: torch.device) -> bool:
    """Whether a graph is being captured on ``device``'s current stream: asked of the torch
    device module named by ``device.type`` (CUDA / ROCm, XPU, or any other that offers
    ``is_current_stream_capturing``), so no backend is named here."""
    capturing = getattr(getattr(torch, device.type, None), "is_current_stream_capturing", None)
    return bool(capturing is not None and capturing())


def neg_exp_float(weight: torch.Tensor) -> torch.Tensor:
    """``-exp(weight)`` in float32: a Mamba / gated DeltaNet head's decay rate from ``A_log``."""
    return -torch.exp(weight.float())


def as_float(weight: torch.Tensor) -> torch.Tensor:
    return weight.float()
