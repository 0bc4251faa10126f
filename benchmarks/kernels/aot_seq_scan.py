"""Compile the sequential Mamba scan (``kernels/mamba/chunk_scan.py``) and the causal conv
kernel (``kernels/mamba/conv1d.py``: outputs and new state in one launch since session 21) for sm90 without a GPU, with and without in-pass
saves (``SAVES``), at a Mamba2 / Granite 4.0-H head (P 64, N 128) as ``sequential_config``
launches it: ptxas' registers, spills and stack per variant, and the PTX's MMAs, global and
shared loads / stores and barriers.

    python3 benchmarks/kernels/aot_seq_scan.py [--ptx DIR] [--conv-only]

Session 20 (mscan, Triton 3.9, ptxas-blackwell for sm_90a): the scan 255 registers both ways,
stack 3040 B / 3080 B, spill stores 3764 / 3772 B, loads 3744 / 3872 B, 336 mma.sync each
(SAVES 0 / 1; the plain kernel before 0d197dc: 3040 B stack, 3840 / 3816 B spills, 336
mma.sync); the conv state kernel 24 / 32 registers, no spills. Session 21 (the conv's outputs
and state in one kernel): 32 registers at BLOCK_T 1, 168 / 161 at 16 (SAVES 0 / 1), no spills.
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

from tessellm.kernels.mamba import chunk_scan, conv1d  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"  # PTX 9.4


def report(tag, fn, types, consts, warps, ptx_dir=None):
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*")}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    ptx = k.asm["ptx"]
    path = Path(f"/tmp/aot_seq_scan_{tag.replace(' ', '_')}.ptx")
    path.write_text(ptx)
    r = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", str(path), "-o", "/dev/null"],
                       capture_output=True, text=True)
    info = "; ".join(line.split("info    :")[-1].strip() for line in r.stderr.splitlines()
                     if "Used" in line or "spill" in line or "stack" in line.lower())
    if ptx_dir:
        Path(ptx_dir).mkdir(parents=True, exist_ok=True)
        (Path(ptx_dir) / path.name).write_text(ptx)
        (Path(ptx_dir) / path.with_suffix(".ttgir").name).write_text(k.asm["ttgir"])
    ops = ", ".join(f"{w} {ptx.count(w)}" for w in ("mma.sync", "ld.global", "st.global",
                                                    "ld.shared", "st.shared", "bar.sync"))
    print(f"{tag}: shared {k.metadata.shared} B | {info or r.stderr.strip()[:300]} | {ops}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ptx", default=None, help="write each variant's PTX and TTGIR here")
    ap.add_argument("--conv-only", action="store_true", help="the conv kernel's variants alone")
    args = ap.parse_args()
    P, N = 64, 128
    block_p, warps = chunk_scan.sequential_config(P, N)
    ptrs = dict(x_ptr="*bf16", dt_ptr="*bf16", a_ptr="*fp32", b_ptr="*bf16", c_ptr="*bf16",
                d_ptr="*fp32", dt_bias_ptr="*fp32", state_ptr="*bf16", qsl_ptr="*i32",
                idx_ptr="*i32", y_ptr="*bf16", snap_ptr="*bf16", save_first_ptr="*i32",
                save_off_ptr="*i32", save_slot_ptr="*i32", dt_lo="fp32", dt_hi="fp32")
    for saves in () if args.conv_only else (False, True):
        report(f"scan P{P} N{N} block_p {block_p} w{warps} saves {int(saves)}",
               chunk_scan._chunk_scan_kernel, ptrs,
               dict(CLAMP=False, SAVES=saves, Q=32, BLOCK_P=block_p, BLOCK_N=N), warps, args.ptx)
    cptrs = dict(x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16", state_ptr="*bf16",
                 qsl_ptr="*i32", idx_ptr="*i32", out_ptr="*bf16", snap_ptr="*bf16",
                 save_first_ptr="*i32", save_off_ptr="*i32", save_slot_ptr="*i32")
    for saves in (False, True):
        for block_t in (1, 16):  # steps of decodes alone; any longer sequence
            report(f"conv block_t {block_t} saves {int(saves)}", conv1d._conv_kernel, cptrs,
                   dict(K=4, HAS_BIAS=True, SILU=True, SAVES=saves, BLOCK_T=block_t, BLOCK_K=4,
                        BLOCK_C=64), 4, args.ptx)


if __name__ == "__main__":
    main()
