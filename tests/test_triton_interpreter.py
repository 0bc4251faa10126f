"""tests/triton_interpreter.py: the interpreter without the nested re-patching gives Triton's own
results bit for bit, and leaves triton.language as it found it."""

from __future__ import annotations

import pytest
import torch

from tessellm import envs

pytestmark = pytest.mark.skipif(not envs.triton_interpret(), reason="Triton's interpreter only")


def test_nested_calls_unpatched_give_tritons_own_bits(monkeypatch):
    triton = pytest.importorskip("triton")
    from triton.runtime import interpreter

    from tessellm.kernels.gemm import bnb4
    from tessellm.quantization.bnb import quantize_bnb4
    from tests.triton_interpreter import skip_nested_patching

    skip_nested_patching()
    assert interpreter._patch_lang.skips_nested
    add = triton.language.core.tensor.__add__
    g = torch.Generator().manual_seed(3)
    w = quantize_bnb4(torch.randn(40, 256, generator=g), "nf4")
    x = torch.randn(3, 256, generator=g)
    bias = torch.randn(40, generator=g)
    # the GEMV calls two nested jit functions per step and row: skipped, then Triton's own
    fast = bnb4.bnb4_gemv(x, w, bias)
    assert triton.language.core.tensor.__add__ is add  # restored after the launch
    monkeypatch.setattr(interpreter, "_patch_lang", interpreter._patch_lang.triton_own)
    assert torch.equal(bnb4.bnb4_gemv(x, w, bias), fast)
