"""Compile the tensor-core int4 GEMM (``kernels/gemm/int4_tc.py``) for sm90 without a GPU and
print shared memory, layout conversions, ptxas' registers and spills, and what the PTX uses
(wgmma or mma.sync, cp.async / TMA pipelining): one line a tile tier as ``int4_tc_config``
launches it (bf16 x, float16 scales, groups of 128, with offsets and with zero point 8).

    python3 benchmarks/kernels/aot_int4_tc.py [--ptx DIR]
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from aot_moe_int4 import PTXAS  # noqa: E402

from tessellm.kernels.gemm import int4_tc  # noqa: E402


def report(tag, fn, types, consts, warps, stages, ptx_dir=None):
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in consts else types[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in types
             if n in names and (types[n].startswith("*") or n.startswith("stride") or n == "K")}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    ptx = k.asm["ptx"]
    info = ""
    if PTXAS.exists():
        path = Path("/tmp/aot_int4_tc.ptx")
        path.write_text(ptx)
        r = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", str(path), "-o", "/dev/null"],
                           capture_output=True, text=True)
        info = "; ".join(line.split("info    :")[-1].strip() for line in r.stderr.splitlines()
                         if "Used" in line or "spill" in line)
    if ptx_dir:
        Path(ptx_dir).mkdir(parents=True, exist_ok=True)
        (Path(ptx_dir) / f"{tag.replace(' ', '_')}.ptx").write_text(ptx)
        (Path(ptx_dir) / f"{tag.replace(' ', '_')}.ttgir").write_text(k.asm["ttgir"])
    uses = ", ".join(f"{w} {ptx.count(w)}" for w in ("wgmma.mma_async", "mma.sync",
                                                       "cp.async", "cp.async.bulk", "ld.shared",
                                                       "st.shared", "prmt", "lop3"))
    print(f"{tag}: shared {k.metadata.shared} B, {k.asm['ttgir'].count('convert_layout')} layout "
          f"conversions | {info or 'ptxas not found'} | {uses}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ptx", default=None, help="write each variant's PTX and TTGIR here")
    args = ap.parse_args()
    types = dict(x_ptr="*bf16", qt_ptr="*i32", s_ptr="*fp16", o_ptr="*fp16", bias_ptr="*bf16",
                 out_ptr="*fp32", M="i32", N="i32", K="i32", stride_xm="i32", stride_qn="i32",
                 stride_sg="i32", stride_og="i32", stride_om="i32", stride_split="i32",
                 SPLIT_K="i32")
    for m in (16, 32, 64, 256):
        t = int4_tc.int4_tc_config(m, 4096, 4096, False)
        for offsets in (True, False):
            report(f"tc M={m} {t['BLOCK_M']}x{t['BLOCK_N']} w{t['num_warps']} s{t['num_stages']}"
                   f"{' offsets' if offsets else ' zp8'}", int4_tc._int4_tc_kernel, types,
                   dict(GROUP_SIZE=128, ZERO_POINT=0 if offsets else 8, HAS_OFFSETS=offsets,
                        HAS_BIAS=False, BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"], W16=1,
                        CODE0=128.0 + (0 if offsets else 8), DOT_FP32=False, DOT_PREC="tf32",
                        EVEN_N=True), t["num_warps"], t["num_stages"], args.ptx)
    gemv = dict(types, out_ptr="*fp32")
    gemv.pop("M")
    for rows in (1, 4):
        for offsets in (True, False):
            report(f"tc gemv rows={rows}{' offsets' if offsets else ' zp8'}",
                   int4_tc._int4_tc_gemv_kernel, gemv,
                   dict(GROUP_SIZE=128, ZERO_POINT=0 if offsets else 8, HAS_OFFSETS=offsets,
                        HAS_BIAS=False, ROWS=rows, BLOCK_N=64, EVEN_N=True, USE_PDL=True), 4, 1,
                   args.ptx)
    deq = dict(qt_ptr="*i32", s_ptr="*fp16", o_ptr="*fp16", out_ptr="*bf16", N="i32", K="i32",
               stride_qn="i32", stride_sg="i32", stride_og="i32")
    report("tc dequantize", int4_tc._int4_tc_dequant_kernel, deq,
           dict(GROUP_SIZE=128, ZERO_POINT=0, HAS_OFFSETS=True, BLOCK_N=64), 4, 1, args.ptx)


if __name__ == "__main__":
    main()
