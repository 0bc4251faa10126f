"""Fused ops through intel-extension-for-pytorch's ``ipex.llm.functional`` (the same calls on
``xpu`` and ``cpu`` tensors: IPEX dispatches on the tensor's device): ``rms_norm``,
``add_rms_norm`` and ``silu_mul``. Rotary stays the pure-torch reference (IPEX's
``rotary_embedding`` takes its own sin/cos layout; not wired)."""

from __future__ import annotations

import torch

from tessellm.backends.reference.ops import ReferenceOps


class IpexOps(ReferenceOps):
    name = "ipex.llm.functional"

    def __init__(self, functional):
        self.f = functional  # intel_extension_for_pytorch.llm.functional

    def rms_norm(self, x, weight, eps):
        return self.f.rms_norm(x, weight, eps)

    def fused_add_rms_norm(self, x, residual, weight, eps):
        # add_rms_norm(residual, x, ..., add_back=True) stores x + residual into ``residual``
        # and returns the normed sum (the call vLLM's XPU path makes).
        residual = residual.clone()
        normed = self.f.add_rms_norm(residual, x, weight, None, eps, True)
        return normed, residual

    def silu_and_mul(self, x):
        d = x.shape[-1] // 2
        out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
        self.f.silu_mul(x[..., :d], x[..., d:], out)
        return out


def ipex_functional():
    """``ipex.llm.functional`` when IPEX imports and has the ops used here, else None."""
    try:
        import intel_extension_for_pytorch as ipex

        f = ipex.llm.functional
    except Exception:  # noqa: BLE001 - absent, or a build whose import fails
        return None
    needed = ("rms_norm", "add_rms_norm", "silu_mul")
    return f if all(hasattr(f, n) for n in needed) else None
