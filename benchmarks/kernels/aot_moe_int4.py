"""Compile the int4 MoE Triton kernels for sm90 without a GPU and print what the compiler made of
them: shared memory, layout conversions in the TTGIR, and ptxas' registers and spills.

    python3 benchmarks/kernels/aot_moe_int4.py

A check that runs on a CPU machine (Triton's bundled ptxas): it catches a kernel that does not
compile for the GPU, and shows spills or shared-memory-heavy tiles before a device run. Shapes:
Qwen3-30B-A3B (hidden 2048, expert intermediate 768) and Mixtral-8x7B (4096, 14336), groups of
128, bf16 activations, float16 scales, uint8 zeros; integer arguments marked divisible by 16
as the JIT specializes them. Session 19 (CPU): the grouped GEMM's 16x32x128 decode-size tile
went from 214 registers / 116 KB of shared memory (each int32 word loaded once per element) to
128 / 32 KB (each word once); the decode kernels 94-190 registers, no spills (Mixtral's
act-order up kernel: 255 and a 4-byte spill).
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from tessellm.kernels.moe import decode_int4  # noqa: E402
from tessellm.kernels.moe.fused_moe import _expert_gemm_kernel  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"


def compile_report(tag: str, fn, types: dict, consts: dict, warps: int, stages: int = 1) -> None:
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in consts else types[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in types
             if n in names and (types[n].startswith("*") or n.startswith("stride") or n == "K")}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    info = ""
    if PTXAS.exists():
        ptx = Path("/tmp/aot_moe_int4.ptx")
        ptx.write_text(k.asm["ptx"])
        r = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", str(ptx), "-o", "/dev/null"],
                           capture_output=True, text=True)
        info = "; ".join(line.split("info    :")[-1].strip() for line in r.stderr.splitlines()
                         if "Used" in line or "spill" in line)
    print(f"{tag}: shared {k.metadata.shared} B, {k.asm['ttgir'].count('convert_layout')} layout "
          f"conversions | {info or 'ptxas not found'}", flush=True)


def main() -> None:
    up_types = dict(x_ptr="*bf16", ids_ptr="*i32", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8",
                    act_ptr="*bf16", perm_ptr="*i32", I="i32", KWORDS="i32", stride_xm="i32",
                    stride_we="i32", stride_wn="i32", stride_se="i32", stride_sn="i32",
                    stride_am="i32")
    down_types = dict(act_ptr="*bf16", ids_ptr="*i32", weights_ptr="*fp32", w_ptr="*i32",
                      s_ptr="*fp16", z_ptr="*u8", out_ptr="*bf16", H="i32", KWORDS="i32",
                      stride_am="i32", stride_we="i32", stride_wn="i32", stride_se="i32",
                      stride_sn="i32", stride_om="i32")
    for name, top_k, h, inter in (("qwen3-30b-a3b", 8, 2048, 768),
                                  ("mixtral-8x7b", 2, 4096, 14336)):
        up = decode_int4._tiles(h, 128, False, decode_int4.INT4_DECODE_ROWS[0])
        for perm in (False, True):
            t = dict(up)
            warps = t.pop("num_warps")
            compile_report(f"{name} decode up{' act-order' if perm else ''}",
                           decode_int4._moe_up_int4_kernel, up_types,
                           dict(TOP_K=top_k, HAS_ZEROS=True, HAS_PERM=perm, USE_PDL=False, **t),
                           warps)
        t = decode_int4._tiles(inter, 128, False, decode_int4.INT4_DECODE_ROWS[1])
        warps = t.pop("num_warps")
        compile_report(f"{name} decode down", decode_int4._moe_down_int4_kernel, down_types,
                       dict(TOP_K=top_k, HAS_ZEROS=True, USE_PDL=False, **t), warps)
    g_types = dict(a_ptr="*bf16", b_ptr="*i32", c_ptr="*bf16", scale_ptr="*fp16",
                   weight_ptr="*fp32", bias_ptr="*i32", sorted_ids_ptr="*i32",
                   block_expert_ptr="*i32", num_padded_ptr="*i32", N="i32", K="i32",
                   num_pairs="i32", stride_am="i32", stride_be="i32", stride_bn="i32",
                   stride_cm="i32", stride_se="i32", stride_bias="i32", alpha="fp32",
                   limit="fp32", zeros_ptr="*u8", perm_ptr="*i32")
    # fused_moe._tiles' choices for int4 (and the 16-bit prefill tile int4 does not take yet)
    for (bm, bn, bk, warps, stages), silu in (((16, 32, 128, 4, 4), True),
                                             ((16, 128, 128, 4, 2), False),
                                             ((32, 64, 64, 4, 4), False),
                                             ((64, 128, 64, 4, 3), False),
                                             ((128, 256, 64, 8, 4), False)):
        consts = dict(A_ROW_DIV=8 if silu else 1, HAS_SCALE=True, MUL_WEIGHT=not silu,
                      SILU_MUL=silu, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PREC="tf32",
                      DOT_FP32=False, USE_PDL=False, HAS_BIAS=False, ACT=0, GROUP_N=1,
                      GROUP_K=128, SCALE_ROW=16, INT4=True, HAS_ZEROS=True, HAS_PERM=False)
        try:
            compile_report(f"grouped {bm}x{bn}x{bk} w{warps} s{stages}"
                           f"{' silu-fused' if silu else ''}", _expert_gemm_kernel, g_types,
                           consts, warps, stages)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"grouped {bm}x{bn}x{bk}: does not compile: {type(e).__name__}: "
                  f"{str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
