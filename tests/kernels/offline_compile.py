"""Compiling Triton kernels for a GPU on a machine without one: the tests that check what the
compiler makes of a kernel (it compiles, what its IR holds) while the others run it in the
interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_compile_script(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh Python with this checkout first on its path and without
    ``TRITON_INTERPRET`` (under it ``@triton.jit`` makes interpreter functions, which
    ``triton.compile`` does not take); skips the calling test where this Triton has no NVIDIA
    backend."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    if "No module named 'triton.backends.nvidia'" in proc.stderr:
        pytest.skip("this triton has no NVIDIA backend")
    return proc
