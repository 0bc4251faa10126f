"""Element-wise activations by their HF ``hidden_act`` names, for the MLPs without a gate
(Starcoder2, Phi, GPT-NeoX, Nemotron-H's ``relu2``): torch's functions on every backend (no
backend op to ask for).

``gelu_new`` and ``gelu_fast`` are the tanh approximation written out (HF's NewGELU and
FastGELU), so they take torch's tanh-approximate gelu: the same function."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """HF's ``ReLUSquaredActivation`` (``relu2``): ``relu(x) ** 2``."""
    return torch.square(F.relu(x))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": F.relu,
    "relu2": relu_squared,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str, family: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function HF's ``ACT2FN[name]`` computes; ``family`` names the model in the error."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"{family} config hidden_act={name!r} is not supported; supported: "
                         f"{', '.join(sorted(_ACTIVATIONS))}.")
    return _ACTIVATIONS[name]
