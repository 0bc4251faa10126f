"""The conformance suite on the backends that run on this machine. cpu (real) runs by default;
the emulated lanes (Triton kernels of cuda and rocm under TRITON_INTERPRET=1, the xpu and tpu
pure-torch paths on CPU tensors) are `slow` and run by their ci/ lanes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def conformance(backend: str, *extra: str) -> str:
    env = dict(os.environ)
    if "--emulate" in extra:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "tessellm.testing", "--backend", backend, "-q",
                           *extra], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout


def test_cpu_backend_passes_conformance():
    out = conformance("cpu")
    assert " passed" in out and "failed" not in out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["rocm", "cuda", "xpu", "tpu"])
def test_emulated_backend_passes_kernel_conformance(backend):
    out = conformance(backend, "--emulate")
    assert " passed" in out and "failed" not in out


def test_unavailable_backend_without_emulate_says_how():
    proc = subprocess.run([sys.executable, "-m", "tessellm.testing", "--backend", "tpu", "-q"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 4
    assert "backend 'tpu' is not available on this machine; pass --emulate" in proc.stdout + proc.stderr
