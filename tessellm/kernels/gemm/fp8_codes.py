"""e4m3 codes widened by bit moves instead of the conversion unit (``e4m3_to_16bit``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def e4m3_to_16bit(w, BF16: tl.constexpr, PURE: tl.constexpr = True):
    """e4m3fn -> bf16 (BF16) or fp16, exact, 4 values per 32-bit word, without the conversion
    unit. Each byte ``b`` lands in the high byte of a 16-bit lane; sign kept, the 7 other bits
    shifted into the exponent/mantissa fields, which gives the value times 2^-120 (bf16) or
    2^-8 (fp16); one packed multiply restores it (subnormals map to subnormals, also exact;
    NaN codes, which quantizers never write, become +-480). PURE=False pins it where it stands
    (Triton otherwise may move it into the dot's operand loads)::

        bf16: (t & 0x8000) | ((t >> 4) & 0x07F0)    t = b << 8, then * 2^120
        fp16: (t & 0x8000) | ((t >> 1) & 0x3F80)    then * 2^8
    """
    if BF16:
        y = tl.inline_asm_elementwise(
             ("{ .reg .b32 t0, t1, s0, s1, c, z;\n"
              "mov.b32 c, 0x7B807B80;\n"  # 2^120 in both bf16 lanes
              "mov.b32 z, 0x80008000;\n"  # -0: the fma is a plain multiply
              "prmt.b32 t0, $2, 0, 0x1404;\n"
              "prmt.b32 t1, $2, 0, 0x3424;\n"
              "shr.b32 s0, t0, 4;\n"
              "shr.b32 s1, t1, 4;\n"
              "and.b32 t0, t0, 0x80008000;\n"
              "and.b32 t1, t1, 0x80008000;\n"
              "and.b32 s0, s0, 0x07F007F0;\n"
              "and.b32 s1, s1, 0x07F007F0;\n"
              "or.b32 t0, t0, s0;\n"
              "or.b32 t1, t1, s1;\n"
              "fma.rn.bf16x2 $0, t0, c, z;\n"
              "fma.rn.bf16x2 $1, t1, c, z; }"),
            "=r,=r,r", [w.to(tl.uint8, bitcast=True)], dtype=tl.bfloat16, is_pure=PURE, pack=4)
    else:
        y = tl.inline_asm_elementwise(
             ("{ .reg .b32 t0, t1, s0, s1, c;\n"
              "mov.b32 c, 0x5C005C00;\n"  # 2^8 in both fp16 lanes
              "prmt.b32 t0, $2, 0, 0x1404;\n"
              "prmt.b32 t1, $2, 0, 0x3424;\n"
              "shr.b32 s0, t0, 1;\n"
              "shr.b32 s1, t1, 1;\n"
              "and.b32 t0, t0, 0x80008000;\n"
              "and.b32 t1, t1, 0x80008000;\n"
              "and.b32 s0, s0, 0x3F803F80;\n"
              "and.b32 s1, s1, 0x3F803F80;\n"
              "or.b32 t0, t0, s0;\n"
              "or.b32 t1, t1, s1;\n"
              "mul.rn.f16x2 $0, t0, c;\n"
              "mul.rn.f16x2 $1, t1, c; }"),
            "=r,=r,r", [w.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=PURE, pack=4)
    return y
