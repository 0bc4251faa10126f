"""Compiling Triton kernels for a GPU on a machine without one: the tests that check what the
compiler makes of a kernel (it compiles, what its IR holds) while the others run it in the
interpreter."""

from __future__ import annotations

import os
import re
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


def compile_sm90_ptx(fn, ptrs: dict, consts: dict, num_warps: int = 4) -> str:
    """The PTX of the ``@triton.jit`` kernel ``fn`` compiled for sm_90, for use inside a
    :func:`run_compile_script` script (it needs ``TRITON_INTERPRET`` unset). ``consts`` maps the
    constexpr arguments to their values and ``ptrs`` the pointer arguments to their Triton types
    (``"*bf16"``); an argument named ``eps`` is an fp32 scalar, any other an i32. Pointers and
    integers are declared 16-divisible, as the GEMV launches' are."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name], attrs[(i,)] = ptrs[name], [["tt.divisibility", 16]]
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps))
    return kernel.asm["ptx"]


_ACQ_REL_GPU = re.compile(r"atom\.[a-z_.]*acq_rel[a-z_.]*gpu|atom\.[a-z_.]*gpu[a-z_.]*acq_rel")


def ptx_sync_counts(ptx: str) -> dict:
    """What the cross-CTA epilogues' checks look for in a kernel's PTX: gpu-scope acq_rel
    atomics (the arrival counters), ``ld.global.cg`` loads (read back past L1), CTA barriers,
    ``mul.rn.f32`` (squares kept out of an FMA) and the PDL ``griddepcontrol`` instructions."""
    return dict(atom_acq_rel=len(_ACQ_REL_GPU.findall(ptx)),
                ld_cg=ptx.count("ld.global.cg"),
                bar=ptx.count("bar.sync") + ptx.count("barrier.sync"),
                mul_rn=ptx.count("mul.rn.f32"),
                pdl=ptx.count("griddepcontrol"))


def sm90_counts(fn, ptrs: dict, consts: dict, num_warps: int = 4) -> dict:
    """:func:`ptx_sync_counts` of ``fn`` compiled for sm_90 (:func:`compile_sm90_ptx`)."""
    return ptx_sync_counts(compile_sm90_ptx(fn, ptrs, consts, num_warps))
