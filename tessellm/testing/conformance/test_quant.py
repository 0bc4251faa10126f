"""Quantized linear methods: every scheme a backend declares works, and undeclared ones are
refused (None), so the engine can name the backends that do support a scheme."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.spec import QuantMethod, QuantSpec

# Relative error of x @ W.T allowed per scheme (weights quantized from dense).
REL_TOL = {"fp8": 0.08, "int8": 0.02, "awq": 0.2, "gptq": 0.2, "gguf": 0.2}


def _schemes(target):
    return list(target.backend.capabilities.get("quantization") or [])


def test_undeclared_scheme_is_refused(target):
    assert target.registry.quant_method(target.backend, QuantSpec("no-such-scheme")) is None


def test_declared_schemes(target):
    schemes = _schemes(target)
    if not schemes:
        pytest.skip(f"{target.name} declares no quantization schemes")
    dev = target.device
    for scheme in schemes:
        method = target.registry.quant_method(target.backend, QuantSpec(scheme, dtype=torch.float32))
        assert method is not None, f"{target.name} declares {scheme!r} but returns no method"
        assert isinstance(method, QuantMethod)
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 64, generator=g).to(dev)
        bias = torch.randn(48, generator=g).to(dev)
        x = torch.randn(5, 64, generator=g).to(dev)
        layer = torch.nn.Module()
        with torch.device(dev):
            method.create_weights(layer, 64, 48, torch.float32)
        try:
            method.quantize_dense(layer, weight)
        except NotImplementedError:
            continue  # loads pre-quantized checkpoints only
        method.process_weights_after_loading(layer)
        out = method.apply(layer, x, bias)
        want = x @ weight.t() + bias
        assert out.shape == want.shape and out.dtype == x.dtype
        rel = ((out.float() - want).norm() / want.norm()).item()
        assert rel < REL_TOL.get(scheme, 0.2), f"{scheme}: relative error {rel:.3f}"
