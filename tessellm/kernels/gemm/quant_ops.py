"""``TritonQuantOps``: the contract's ``QuantOps`` on this package's GEMMs (cuda, rocm).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tessellm import envs
from tessellm.kernels.fused_ops import TritonOps
from tessellm.kernels.gemm.common import _interpreted
from tessellm.kernels.gemm.bnb4 import bnb4_mm
from tessellm.kernels.gemm.fp8_block import fp8_block_mm
from tessellm.kernels.gemm.fp8 import _scaled_mm_ok, fp8_gemm, quantize_fp8_rows, scaled_mm_plan
from tessellm.kernels.gemm.gemv_int4 import INT4_GEMV_MAX_M, gemv_int4
from tessellm.kernels.gemm.int4_tc import (int4_tc_dequantize, int4_tc_gemm, int4_tc_gemv,
                                           int4_tc_pack, tc_layout_ok)
from tessellm.kernels.gemm.gemv_x2 import gemv_fp8_x2_silu_and_mul, gemv_fp8_x2_then_add_rms_norm
from tessellm.kernels.gemm.gemv_fold import (gemv_fp8_x2_add_rms_norm_fold,
                                             gemv_fp8_x2_rms_scaled)
from tessellm.kernels.gemm.norm_epilogue import norm_epilogue_applies
from tessellm.kernels.gemm.norm_fold import (consume_applies, fold_applies, fold_reference,
                                             rms_scaled_reference)
from tessellm.kernels.gemm.w8a8 import gemv_w8a8, w8a8_native
from tessellm.kernels.gemm.weight_only import (
    DEQUANT_MIN_M,
    _use_gemv_x2,
    fp8_weight_only_gemm,
    int4_dequantize,
    int4_gemm,
    int8_dequantize,
    int8_gemm,
)
from tessellm.kernels.op_flags import QUANT_OPS_FLAGS, drop_unowned_flags
from tessellm.quantization.packed import Fp8Activation, Fp8Weight, Int4Weight, Int8Weight

# fp8 GEMMs of at most this many rows read the weight as W8A16 instead of quantizing x for
# torch._scaled_mm, which is slower than bf16 at small M. H200, one Llama-8B layer's GEMMs in a
# CUDA graph (benchmarks/quantization/fp8_kernels.py): W8A16 81-92 us vs W8A8 132-137 us at
# M = 1..16, 112.5 vs 126.6 at M = 32, 153 vs 122 at M = 64.
FP8_WEIGHT_ONLY_MAX_M = 32
# gemv.gemv_w8a8 up to this many rows where the GPU has fp8 MMA: off (0). On an H200 it lost to
# W8A16 at one row: Llama-8B layer 81.1 us vs 74.6, B1 3.549 vs 3.192 ms (gemv.py docstring).
FP8_SKINNY_W8A8_MAX_M = 0
# The W8A8 prefill path with its checks and weight views cached per weight
# (``fp8.scaled_mm_plan``): an eager prefill launches 4 such GEMMs a layer and is bound by the
# host's launch work (H200, 2026-12-04: 128 fp8 GEMMs at M = 512 took 8.3 ms eager against
# 6.8 ms as a graph, so ~65 us of host time each; benchmarks/results/h200-2026-12-04-gpuperf).
FP8_LEAN_W8A8 = True  # default of TESSELLM_FP8_LEAN_W8A8
# Dense AWQ / GPTQ int4 on codes re-laid at load for the tensor-core GEMM (``int4_tc.py``;
# default of TESSELLM_INT4_TC). H100, Llama-3.1-8B layer, us (benchmarks/README.md session 20):
# rows        1      4     16     64    256   1024
# bf16      180    180    181    181    217    551
# gemv_int4 107    171      -      -      -      -   (the checkpoint layout's GEMV)
# old tiled   -      -    307    273    734    763   (checkpoint layout; 1024: dequantize)
# tc GEMM   128    130    134    233    583      -
# tc GEMV   105    205      -      -      -      -
# tc deq.     -      -      -    413    452    802   (tc dequantize + cuBLAS)
INT4_TC = True
# The tc layout only (default of TESSELLM_INT4_TC_GEMV): the checkpoint layout is dropped at
# load (``qweight`` emptied to ``[0, N]``), so the codes take their memory once; one row takes
# the tc GEMV (105 us a layer against gemv_int4's 107), 2-4 rows the tc GEMM (130 against 171
# at 4). "0" keeps both layouts (twice the codes' memory) for gemv_int4 at 1-4 rows.
INT4_TC_GEMV = True
# From this many rows the tc layout's products dequantize once and let cuBLAS multiply (tc GEMM
# 233 us a layer at 64 rows against 413, 583 at 256 against 452: the crossover near 160).
INT4_TC_DEQUANT_MIN_M = 160
_SILU = TritonOps()  # fp8_mm_silu_and_mul's activation where the GEMV cannot fold it


class TritonQuantOps:
    """``QuantOps`` for the cuda backend (and any Triton GPU). ``use_scaled_mm``: False forces
    the Triton fp8 GEMM (tests, GPUs without cuBLASLt fp8). ``fp8_weight_only_max_m``: fp8
    GEMMs of at most this many rows run weight-only (W8A16, ``fp8_weight_only_gemm``); 0 never.
    ``fp8_skinny_w8a8_max_m``: up to this many rows take ``gemv.gemv_w8a8`` instead, where the
    GPU has fp8 MMA (default ``FP8_SKINNY_W8A8_MAX_M``: 0, never; slower on an H200).
    ``int4_tc``: False never re-lays int4 codes for the tensor-core GEMM (``prepare_int4``);
    None: ``INT4_TC`` / TESSELLM_INT4_TC.
    """

    name = "triton"
    schemes = frozenset({"int8", "fp8", "fp8_block", "awq", "gptq", "gguf", "bitsandbytes"})

    def __init_subclass__(cls, **kwargs):
        """The one rule of optional flags (``op_flags.drop_unowned_flags``); ``QuantOps``
        has none yet (``op_flags.QUANT_OPS_FLAGS``): one added there is dropped from a subclass
        that replaces its op."""
        super().__init_subclass__(**kwargs)
        drop_unowned_flags(cls, QUANT_OPS_FLAGS)

    def __init__(self, use_scaled_mm: bool = True, dequant_min_m: int = DEQUANT_MIN_M,
                 fp8_weight_only_max_m: int = FP8_WEIGHT_ONLY_MAX_M,
                 fp8_skinny_w8a8_max_m: Optional[int] = None, int4_tc: Optional[bool] = None):
        self.use_scaled_mm = use_scaled_mm
        self.dequant_min_m = dequant_min_m
        self.fp8_weight_only_max_m = fp8_weight_only_max_m
        self.fp8_skinny_w8a8_max_m = (FP8_SKINNY_W8A8_MAX_M if fp8_skinny_w8a8_max_m is None
                                      else fp8_skinny_w8a8_max_m)  # None: read when built
        lean = envs.fp8_lean_w8a8()
        self.lean_w8a8 = FP8_LEAN_W8A8 if lean is None else lean  # read when built
        tc = envs.int4_tc()
        # read when built; an explicit False (the rocm backend: not run on AMD yet) stays off
        self.int4_tc = (INT4_TC if tc is None else tc) if int4_tc is not False else False
        tc_gemv = envs.int4_tc_gemv()
        self.int4_tc_gemv = INT4_TC_GEMV if tc_gemv is None else tc_gemv

    def int8_mm(self, x, w: Int8Weight, bias=None):
        if x.shape[0] >= self.dequant_min_m and not _interpreted(x):
            return F.linear(x, int8_dequantize(w, x.dtype), bias)
        return int8_gemm(x, w, bias)

    def prepare_int4(self, w: Int4Weight) -> None:
        """The optional ``QuantOps`` member, once per int4 segment after loading: adds the
        codes in the tensor-core GEMM's layout (``w.tc_qweight``, ``int4_tc.int4_tc_pack``)
        where ``int4_tc`` is on and K and the group are multiples of 128. With ``int4_tc_gemv``
        (the default) ``w.qweight`` is then emptied to ``[0, N]`` (``Int4Weight.dequantize``
        reads the tc codes): the codes are held once; else the checkpoint layout stays beside
        them for ``gemv_int4`` at 1-4 rows."""
        k = w.qweight.shape[0] * 8
        if self.int4_tc and w.tc_qweight is None and tc_layout_ok(k, w.group_size):
            w.tc_qweight = int4_tc_pack(w.qweight)
            if self.int4_tc_gemv:
                w.qweight = w.qweight.new_empty(0, w.qweight.shape[1])

    def int4_mm(self, x, w: Int4Weight, bias=None):
        """On the tc layout only (``prepare_int4`` with ``int4_tc_gemv``, the default): one
        row the tc GEMV (``int4_tc_gemv``), then the tensor-core GEMM (``int4_tc_gemm``), from
        ``INT4_TC_DEQUANT_MIN_M`` rows (or ``dequant_min_m`` if lower) the weight dequantized
        once and cuBLAS. With the checkpoint layout kept: 1..``INT4_GEMV_MAX_M`` rows the int4
        GEMV (``gemv_int4``), then the tc GEMM where the tc layout exists or else the tiled
        GEMM dequantizing in its tiles, from ``dequant_min_m`` rows dequantize + cuBLAS."""
        tc = w.tc_qweight is not None
        m = x.shape[0]
        if 0 < m <= INT4_GEMV_MAX_M:
            if w.qweight.shape[0] > 0:
                return gemv_int4(x, w, bias)
            if m == 1:
                return int4_tc_gemv(x, w, bias)
        dequant_min_m = min(self.dequant_min_m, INT4_TC_DEQUANT_MIN_M) if tc else \
            self.dequant_min_m
        if m >= dequant_min_m and not _interpreted(x):
            if w.perm is not None:
                x = x.index_select(-1, w.perm)
            dense = int4_tc_dequantize(w, x.dtype) if tc else int4_dequantize(w, x.dtype)
            return F.linear(x, dense, bias)
        if tc:
            return int4_tc_gemm(x, w, bias)
        return int4_gemm(x, w, bias)

    def fp8_block_mm(self, x, w, bias=None):
        """Block-wise fp8 (``quantization/fp8_block.py``): W8A8 at every M, x quantized per
        token and group of the weight's ``bk`` (``gemm/fp8_block.py``). Not measured on a GPU
        yet; at decode a W8A16 kernel (as ``fp8_mm`` takes) may beat it."""
        return fp8_block_mm(x, w, bias)

    def bnb4_mm(self, x, w, bias=None):
        """bitsandbytes 4-bit (``quantization/bnb.py``, ``gemm/bnb4.py``): up to
        ``bnb4.GEMV_MAX_M`` rows a GEMV reading the codes once, else the Triton dequantization
        (``code[q] * absmax`` a flat block) into x's dtype, then cuBLAS (docs/quantization.md
        has the H100 figures)."""
        return bnb4_mm(x, w, bias)

    def fp8_mm_silu_and_mul(self, x, w: Fp8Weight, bias=None):
        """``silu_and_mul(fp8_mm(x, w, bias))`` for a stacked ``[gate; up]`` weight (the
        optional ``QuantOps`` member): one launch where ``fp8_mm`` takes the one-row
        ``gemv_fp8_x2`` (the activation in its epilogue, bitwise the two launches), else
        ``fp8_mm`` then the Triton SiLU-and-mul."""
        if (x.shape[0] == 1 and w.qweight.shape[0] % 2 == 0 and self.fp8_skinny_w8a8_max_m < 1
                and self.fp8_weight_only_max_m >= 1 and _use_gemv_x2(x, w.qweight)):
            return gemv_fp8_x2_silu_and_mul(x, w.qweight, w.scales, bias)
        return _SILU.silu_and_mul(self.fp8_mm(x, w, bias))

    def fp8_mm_add_rms_norm(self, x, w: Fp8Weight, residual, norm_weight, eps: float,
                            bias=None):
        """``fused_add_rms_norm(fp8_mm(x, w, bias), residual, norm_weight, eps)`` (the optional
        ``QuantOps`` member): one launch where ``fp8_mm`` takes the one-row ``gemv_fp8_x2`` (the
        norm in its last program, ``gemm/norm_epilogue.py``, bitwise the two launches), else
        ``fp8_mm`` then the Triton add-RMSNorm. Returns ``(normed, residual)``."""
        if (x.dim() == 2 and x.shape[0] == 1 and self.fp8_skinny_w8a8_max_m < 1
                and self.fp8_weight_only_max_m >= 1 and _use_gemv_x2(x, w.qweight)
                and norm_epilogue_applies(x, w.qweight.shape[0], residual, norm_weight)):
            return gemv_fp8_x2_then_add_rms_norm(x, w.qweight, w.scales, residual, norm_weight,
                                                 eps, bias)
        return _SILU.fused_add_rms_norm(self.fp8_mm(x, w, bias), residual, norm_weight, eps)

    def fp8_mm_add_rms_norm_fold(self, x, w: Fp8Weight, residual, norm_weight, bias=None):
        """The producer's half of a split residual-add RMSNorm (the optional ``QuantOps``
        member; ``gemm/norm_fold.py``): where ``fp8_mm`` takes the one-row ``gemv_fp8_x2``, its
        epilogue stores the new residual, ``round(h * norm_weight)`` and a partial sum of
        squares a program; else ``fp8_mm`` and the same in torch. ``(xg, sumsq, residual)``."""
        if (self._one_row_x2(x, w)
                and fold_applies(x, w.qweight.shape[0], residual, norm_weight)):
            xg, sumsq = gemv_fp8_x2_add_rms_norm_fold(x, w.qweight, w.scales, residual,
                                                      norm_weight, bias)
            return xg, sumsq, residual
        return fold_reference(self.fp8_mm(x, w, bias), residual, norm_weight)

    def fp8_mm_rms_scaled(self, x, w: Fp8Weight, sumsq, eps: float, bias=None,
                          silu_and_mul: bool = False):
        """The consumer's half (the optional ``QuantOps`` member): ``fp8_mm(x, w) * rsqrt(
        sum(sumsq) / K + eps) + bias`` (then ``silu_and_mul`` if asked), the scale in the
        one-row ``gemv_fp8_x2``'s epilogue where ``fp8_mm`` takes it."""
        if (self._one_row_x2(x, w) and consume_applies(x, sumsq)
                and not (silu_and_mul and w.qweight.shape[0] % 2)):
            return gemv_fp8_x2_rms_scaled(x, w.qweight, w.scales, sumsq, eps, bias,
                                          silu_and_mul)
        y = rms_scaled_reference(self.fp8_mm(x, w), sumsq, x.shape[-1], eps, bias).to(x.dtype)
        return _SILU.silu_and_mul(y) if silu_and_mul else y

    def _one_row_x2(self, x, w: Fp8Weight) -> bool:
        """``fp8_mm`` takes the one-row ``gemv_fp8_x2`` for ``x``."""
        return (x.dim() == 2 and x.shape[0] == 1 and self.fp8_skinny_w8a8_max_m < 1
                and self.fp8_weight_only_max_m >= 1 and _use_gemv_x2(x, w.qweight))

    def fp8_mm(self, x, w: Fp8Weight, bias=None):
        """Decode: W8A16 up to ``fp8_weight_only_max_m`` rows (or, if asked, up to
        ``fp8_skinny_w8a8_max_m`` rows, W8A8 through ``gemv.gemv_w8a8`` where the GPU has fp8
        MMA). Above, W8A8 (x quantized by its own kernel, then ``torch._scaled_mm`` or the
        Triton GEMM). x's shape is fixed per captured graph, so a graph always takes one side."""
        m = x.shape[0]
        if m <= self.fp8_skinny_w8a8_max_m:
            if w8a8_native(x, w.qweight):
                return gemv_w8a8(x, w.qweight, w.scales, bias)
        if m <= self.fp8_weight_only_max_m:
            return fp8_weight_only_gemm(x, w, bias)
        xq, sx = quantize_fp8_rows(x, w.qweight.dtype, keepdim=True)
        return self._w8a8(xq, sx, w, x.dtype, bias)

    def fp8_w8a8_rows(self, rows: int) -> bool:
        """Whether ``fp8_mm`` at ``rows`` rows quantizes x per token (``quantize_fp8_rows``)
        for the W8A8 GEMM, so an activation quantized by its producer (the fold's Triton
        kernels, bitwise that quantizer) gives ``fp8_mm_prequantized`` the same product."""
        return rows > self.fp8_weight_only_max_m and rows > self.fp8_skinny_w8a8_max_m

    def fp8_mm_prequantized(self, xa: Fp8Activation, w: Fp8Weight, bias=None):
        """``fp8_mm``'s W8A8 product for an activation already quantized per token (the
        optional ``QuantOps`` member; the fp8 activation fold)."""
        return self._w8a8(xa.qx, xa.scales, w, xa.dtype, bias)

    def _w8a8(self, xq, sx, w: Fp8Weight, out_dtype: torch.dtype, bias):
        """``(xq @ w.T) * sx * w.scales`` (+ bias) in ``out_dtype``; ``sx`` ``[M, 1]``."""
        if self.use_scaled_mm:
            if self.lean_w8a8:
                plan = scaled_mm_plan(xq, w)
            else:
                plan = (w.qweight.t(), w.scales[None, :]) if _scaled_mm_ok(xq, w) else None
            if plan is not None:
                out = torch._scaled_mm(xq, plan[0], scale_a=sx, scale_b=plan[1],
                                       out_dtype=torch.bfloat16)
                if out.dtype != out_dtype:
                    out = out.to(out_dtype)
                return out if bias is None else out.add_(bias)
        return fp8_gemm(xq, sx.view(-1), w, out_dtype, bias)
