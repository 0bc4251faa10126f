"""Fused ops through intel-extension-for-pytorch's ``ipex.llm.functional`` where it has them;
rotary stays the pure-torch reference (its IPEX signature changed across releases)."""

from __future__ import annotations

import torch

from tessellm.backends.reference.ops import ReferenceOps


class IpexOps(ReferenceOps):
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
        out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
        self.f.silu_and_mul(x, out)
        return out


def ipex_functional():
    try:
        import intel_extension_for_pytorch as ipex

        f = ipex.llm.functional
    except Exception:  # noqa: BLE001
        return None
    needed = ("rms_norm", "add_rms_norm", "silu_and_mul")
    return f if all(hasattr(f, n) for n in needed) else None
