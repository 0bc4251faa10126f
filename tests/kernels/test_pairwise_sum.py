"""``kernels/pairwise_sum.py``: a sum whose order is fixed by index, so every kernel that
normalizes a row gets the same ``rstd`` bits whatever layout the compiler picks for it.

Issue 22: on an H100 the fp8 activation fold's RMSNorm was not bitwise RMSNorm then the
quantizer, because ``tl.sum(x * x)`` reduced in a different order in each kernel (compiled for
sm_90, the plain kernel holds 4 or 8 consecutive elements a thread, the fp8 one 16: its 16-byte
fp8 store sets the layout). In the interpreter the order is always numpy's, so the second test
checks what the GPU runs: the norm kernels compiled for sm_90 (no GPU needed) add only pairs
and contain no FMA.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tessellm.kernels.pairwise_sum import pairwise_sum  # noqa: E402
from tests.kernels.offline_compile import run_compile_script  # noqa: E402


@triton.jit
def _sum_rows_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + tl.program_id(0) * n + cols, mask=cols < n, other=0.0)
    tl.store(out_ptr + tl.program_id(0), pairwise_sum(x))


def _pairwise(v: np.ndarray) -> np.float32:
    while len(v) > 1:
        v = v[0::2] + v[1::2]  # float32 + float32: one rounding each
    return v[0]


@pytest.mark.parametrize("n", [1, 2, 200, 256])
def test_pairwise_sum_adds_pairs_by_index(n):
    """The bits of the pairwise tree (rows padded with zeros to the block), not merely close."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(3, n, generator=g) * torch.logspace(-3, 3, n)).float()
    block = triton.next_power_of_2(n)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(3, device=dev)
    _sum_rows_kernel[(3,)](x.to(dev), out, n, BLOCK=block)
    padded = np.zeros((3, block), np.float32)
    padded[:, :n] = x.numpy()
    want = [_pairwise(row) for row in padded]
    assert out.cpu().numpy().tolist() == want
    if n >= 200:  # the data tells orders apart: a left-to-right sum has other bits
        in_order = [np.add.accumulate(row, dtype=np.float32)[-1] for row in padded]
        assert in_order != want


_COMPILE = """
import json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tessellm.kernels import norm

def compile_sm90(fn, args, consts, num_warps):
    # as the JIT specializes a launch: 16-byte aligned pointers, ints divisible by 16
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        v = consts.get(name, args.get(name))
        if name in consts:
            sig[name] = "constexpr"
        elif isinstance(v, str):
            sig[name], attrs[(i,)] = v, [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if isinstance(v, float) else "i32"
            if isinstance(v, int) and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, **norm.NORM_LAUNCH_OPTIONS)).asm

def add_reductions(ttgir):
    # (extent of the reduced axis) of every tt.reduce whose combine is an addf
    out, axis, adds = [], None, False
    for line in ttgir.splitlines():
        m = re.search(r'"tt.reduce".*axis = (\\d+)', line)
        if m:
            axis, adds = int(m.group(1)), False
        elif axis is not None and "arith.addf" in line:
            adds = True
        elif axis is not None and line.strip().startswith("}) : (tensor<"):
            shape = re.search(r"tensor<([0-9x]+)x[a-z]", line).group(1).split("x")
            if adds:
                out.append(int(shape[axis]))
            axis = None
    return out

found = []
for dt, hidden, res in (("fp32", 4096, False), ("bf16", 5120, True)):
    block = triton.next_power_of_2(hidden)
    warps = min(16, max(1, block // 512))  # as norm._launch
    ptr = "*" + dt
    rows = dict(x_ptr=ptr, res_ptr=ptr, w_ptr=ptr, res_out_ptr=ptr, hidden=hidden, eps=1e-6,
                stride_x=hidden, stride_res=hidden, stride_res_out=hidden)
    flags = dict(HAS_RESIDUAL=res, BLOCK=block, USE_PDL=False)
    out_dt = dict(fp32=tl.float32, bf16=tl.bfloat16)[dt]
    for name, fn, args, consts in (
            ("rms_norm", norm._rms_norm_kernel, dict(out_ptr=ptr, stride_out=hidden), {}),
            ("rms_norm_fp8", norm._rms_norm_fp8_kernel,
             dict(q_ptr="*fp8e4nv", s_ptr="*fp32", stride_q=hidden),
             dict(OUT_DTYPE=out_dt, FP8_MAX=448.0))):
        asm = compile_sm90(fn, dict(rows, **args), dict(flags, **consts), warps)
        found.append(dict(kernel=name, dtype=dt, hidden=hidden, residual=res,
                          sums=add_reductions(asm["ttgir"]), fma=asm["ptx"].count("fma.")))
print("RESULT" + json.dumps(found))
"""


def test_norm_kernels_sum_squares_in_a_fixed_order_on_sm90():
    """Compiled for sm_90 (offline, no GPU), ``_rms_norm_kernel`` and ``_rms_norm_fp8_kernel``
    sum the squares only two values at a time (a ``tl.sum`` over a whole row would add in
    an order set by the layout, which differs between them) and contain no FMA (a square
    fused into an add would make the order matter again; ``NORM_LAUNCH_OPTIONS``)."""
    proc = run_compile_script(_COMPILE)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
    found = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(found) == 4
    for k in found:
        block = triton.next_power_of_2(k["hidden"])
        assert k["sums"] and max(k["sums"]) <= 2, k  # pairs only
        assert len(k["sums"]) >= block.bit_length() - 1, k  # the whole tree
        assert k["fma"] == 0, k
