"""Split-K in the Triton GEMMs is deterministic: each K range stores its partial product in its
own plane of a ``[split, M, N]`` buffer and the planes are summed after (``gemm/common.py``);
no kernel adds into the output with atomics (float32 atomics add in the order the programs
finish, so two calls on the same input could differ in the last bit).

Two checks here: the tiled quantized GEMMs with K split three ways (in the interpreter a shape
never splits by itself: ``_tiles`` splits only on a GPU) equal the same GEMM unsplit, the bias
counted once; and every split-K kernel compiled offline for sm_90 (no GPU needed) holds no
atomic instruction (``atom.``/``red.`` in the PTX, ``atomic_rmw`` in the TTGIR), the detector
itself checked on a kernel that does add atomically. What needs a GPU: the bits of two calls of
each launch compared (``test_fp8_fold.py``'s fp8 GEMM test does it for ``fp8_gemm``)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from tessellm.kernels.gemm import common, fp8  # noqa: E402
from tessellm.kernels.gemm import weight_only as wo  # noqa: E402
from tessellm.quantization.packed import (Int4Weight, pack_int4,  # noqa: E402
                                          quantize_fp8, quantize_fp8_per_token, quantize_int4,
                                          quantize_int8)
from tests.kernels.offline_compile import run_compile_script  # noqa: E402

ON_GPU = torch.cuda.is_available()


def _split_tiles(split: int):
    """``common._tiles`` with K split ``split`` ways (what a GPU picks for a small grid)."""
    def tiles(x, m, n, k, group, config=None):
        t = common._tiles(x, m, n, k, group, config)
        t["SPLIT_K"] = split
        t["grid"] = (*t["grid"][:2], split)
        return t
    return tiles


def _gemms(x, bias):
    """Each tiled GEMM with a split-K path, on x's device, as name -> call."""
    n, k = 40, x.shape[1]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g) * 0.05
    dev = x.device
    i8g = quantize_int8(w, group_size=32).to(dev)
    i8c = quantize_int8(w).to(dev)
    q, sc, z = quantize_int4(w, 32)
    i4 = Int4Weight(pack_int4(q), sc, -z * sc, 0, 32).to(dev)
    f8 = quantize_fp8(w).to(dev)
    xq, xs = quantize_fp8_per_token(x.float())
    return {
        "int8-grouped": lambda: wo.int8_gemm(x, i8g, bias),
        "int8-channel": lambda: wo.int8_gemm(x, i8c, bias),
        "int4": lambda: wo.int4_gemm(x, i4, bias),
        "fp8-w8a16": lambda: wo.fp8_w8a16_tiled(x, f8.qweight, f8.scales, bias),
        "fp8-w8a8": lambda: fp8.fp8_gemm(xq, xs, f8, x.dtype, bias),
    }


@pytest.mark.skipif(ON_GPU, reason="the interpreter's check; on a GPU the shapes split by themselves")
@pytest.mark.parametrize("bias", [False, True])
def test_split_k_planes_sum_to_the_unsplit_product(monkeypatch, bias):
    """K = 160 in 32-wide steps split 3 ways (ranges of 64, 64, 32: one short): each GEMM's
    planes summed equal its one-range product to float32 rounding; a bias counted once."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 160, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    whole = {name: f() for name, f in _gemms(x, b).items()}
    for mod in (wo, fp8):
        monkeypatch.setattr(mod, "_tiles", _split_tiles(3))
    for name, f in _gemms(x, b).items():
        got = f()
        assert got.shape == whole[name].shape and got.dtype == whole[name].dtype, name
        torch.testing.assert_close(got, whole[name], rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(f(), got), name


_COMPILE = r"""
import json, os, re, sys, tempfile, importlib
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tessellm.kernels.gemm import fp8, gemv, gemv_x2, w8a8, weight_only as wo
from tessellm.kernels.lora import shrink as lora_shrink

def compile_sm90(fn, ptrs, consts, ints=64, num_warps=4):
    # the launch's signature: pointers as given, constexprs as given, any other argument an
    # int (strides, sizes, SPLIT_K) divisible by 16 as the JIT would specialize it; a kernel
    # from before the split planes takes ATOMIC=True (the split launch's value)
    sig, attrs, cst = {}, {}, dict(consts)
    if "ATOMIC" in fn.arg_names:
        cst["ATOMIC"] = True
    for i, name in enumerate(fn.arg_names):
        if name in cst:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name], attrs[(i,)] = ptrs[name], [["tt.divisibility", 16]]
        else:
            sig[name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
    cst = {k: v for k, v in cst.items() if k in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=cst, attrs=attrs)
    asm = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps)).asm
    return dict(atom=len(re.findall(r"\b(atom|red)\.", asm["ptx"])),
                rmw=asm["ttgir"].count("atomic_rmw"), stores=asm["ptx"].count("st.global"))

bf, f32 = "*bf16", "*fp32"
tiled = dict(HAS_BIAS=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, DOT_FP32=False, DOT_PREC="tf32")
skinny = dict(HAS_BIAS=True, EVEN_K=True, BLOCK_N=64, BLOCK_K=128, STAGES=1, USE_PDL=False)
cases = {
    "w8a16-int8": (wo._w8a16_gemm_kernel, dict(x_ptr=bf, w_ptr="*i8", s_ptr=f32, bias_ptr=bf, out_ptr=f32),
                   dict(tiled, GROUP_SIZE=128, PER_CHANNEL=False, W_FP8=False, W_PTX=False)),
    "w8a16-fp8": (wo._w8a16_gemm_kernel, dict(x_ptr=bf, w_ptr="*fp8e4nv", s_ptr=f32, bias_ptr=bf, out_ptr=f32),
                  dict(tiled, GROUP_SIZE=1, PER_CHANNEL=True, W_FP8=True, W_PTX=True)),
    "int4": (wo._int4_gemm_kernel, dict(x_ptr=bf, q_ptr="*i32", s_ptr=bf, o_ptr=bf, bias_ptr=bf, out_ptr=f32),
             dict(tiled, GROUP_SIZE=128, ZERO_POINT=8, HAS_OFFSETS=True, W16=1)),
    "fp8-gemm": (fp8._fp8_gemm_kernel, dict(x_ptr="*fp8e4nv", sx_ptr=f32, w_ptr="*fp8e4nv", sw_ptr=f32,
                                            bias_ptr=bf, out_ptr=f32),
                 dict(HAS_BIAS=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, DOT_FP32=False)),
    "gemv-fma": (gemv._gemv_fma_kernel, dict(x_ptr=bf, w_ptr=bf, s_ptr=bf, bias_ptr=bf, out_ptr=f32),
                 dict(skinny, W_FP8=False, W_PTX=False, BLOCK_M=2, BLOCK_N=2, BLOCK_K=512, CHUNK=8,
                      F32_BITS=False, PTX=True, SILU_FOLD=False, PRE_TILES=1, PRE_L2=False,
                      PRE_S=True, NORM_EPI=False, NORM_BLOCK=1, SPLIT_LAST=0)),
    "gemv-dot-fp8": (gemv._gemv_dot_kernel, dict(x_ptr=bf, w_ptr="*fp8e4nv", s_ptr=f32, bias_ptr=bf, out_ptr=f32),
                     dict(skinny, W_FP8=True, W_PTX=True, BLOCK_M=16, DOT_FP32=False)),
    "gemv-w8a8": (w8a8._gemv_w8a8_kernel, dict(x_ptr=bf, xs_ptr=f32, w_ptr="*fp8e4nv", s_ptr=f32, bias_ptr=bf,
                                               out_ptr=f32),
                  dict(skinny, FP8_MAX=448.0, X_QUANT=True, BLOCK_M=16, BLOCK_K=256, NATIVE=True,
                       SCALE_BLOCK=2048)),
    "gemv-x2": (gemv_x2._gemv_e4m3_x2_kernel, dict(x_ptr=bf, w_ptr="*fp8e4nv", s_ptr=f32, bias_ptr=bf,
                                                   out_ptr=f32),
                dict(HAS_BIAS=True, EVEN_K=True, BLOCK_N=4, BLOCK_KW=256, PTX=True, SILU_FOLD=False,
                     PRE_TILES=1, PRE_L2=False, PRE_S=True, NORM_EPI=False, NORM_BLOCK=1,
                     SPLIT_LAST=0, USE_PDL=False)),
    "lora-shrink": (lora_shrink._shrink_kernel,
                    dict(x_ptr=bf, a_ptr=bf, out_ptr=f32, sorted_ids_ptr="*i32", block_slot_ptr="*i32",
                         num_padded_ptr="*i32"),
                    dict(SPLIT_K=4, BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, DOT_PREC="tf32", DOT_FP32=False)),
}
found = {name: compile_sm90(fn, ptrs, consts) for name, (fn, ptrs, consts) in cases.items()}

# the detector on a kernel that does add atomically (a float32 add into out, result unused)
ctl = os.path.join(tempfile.mkdtemp(), "atomic_ctl.py")
with open(ctl, "w") as f:
    f.write("import triton, triton.language as tl\n"
            "@triton.jit\n"
            "def ctl_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):\n"
            "    r = tl.arange(0, BLOCK)\n"
            "    tl.atomic_add(out_ptr + r, tl.load(x_ptr + r, mask=r < N), mask=r < N)\n")
sys.path.insert(0, os.path.dirname(ctl))
found["control"] = compile_sm90(importlib.import_module("atomic_ctl").ctl_kernel,
                                dict(x_ptr=f32, out_ptr=f32), dict(BLOCK=128))
print("RESULT" + json.dumps(found))
"""


def test_split_k_kernels_hold_no_atomics_on_sm90():
    """Every split-K GEMM kernel (tiled int8 / fp8 W8A16, int4, the fp8 W8A8 fallback, the
    skinny FMA and dot GEMVs, the skinny W8A8, the e4m3 bf16x2 GEMV, the LoRA shrink) compiled
    for sm_90 stores its output with plain stores: no ``atom.``/``red.`` instruction in the
    PTX, no ``atomic_rmw`` in the TTGIR. The same compile of an ``atomic_add`` kernel shows
    both."""
    proc = run_compile_script(_COMPILE)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
    found = json.loads(proc.stdout.split("RESULT", 1)[1])
    control = found.pop("control")
    assert control["atom"] > 0 and control["rmw"] > 0, control
    assert len(found) == 9
    for name, k in found.items():
        assert k["atom"] == 0 and k["rmw"] == 0 and k["stores"] > 0, (name, k)
