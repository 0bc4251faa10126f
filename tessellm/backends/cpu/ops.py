"""The cpu backend's ``FusedOps`` (the reference ops, plus a ``linear`` for wide products, a
one-call float32 RMSNorm and a native or one-allocation SiLU-and-mul) and
``LogitsOps`` (the reference bitmask, plus a two-pass argmax)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tessellm import envs
from tessellm.backends.cpu import native
from tessellm.backends.cpu.moe import fused_moe_grouped, grouped_experts
from tessellm.backends.reference.logits import ReferenceLogitsOps
from tessellm.backends.reference.ops import ReferenceOps, fold_out, rms_scaled

# Column blocks of a wide product (the LM head: N = vocab) when it has no packed copy. 2 cores (AVX-512), float32, x
# [64, 576] @ W[49152, 576].T: 34 ms in blocks of 2048 columns against 54 ms in one call
# (MKL); equal at one row. Each output element is the same dot over K either way: the blocked
# result is bitwise identical (checked at M = 1..64), so greedy parity with HF is unchanged.
BLOCK_N = 2048
MIN_N = 8 * BLOCK_N
MIN_M = 8


# The model's float32 linears (qkv, o, gate-up, down and the LM head) run on oneDNN with the
# weight reordered once into its blocked layout (``PACK_HINT``: the batch size the layout is
# chosen for). Measured on 2 cores (AVX-512), one thread, SmolLM2's four layer products: 0.68-0.92x
# of MKL's time from M = 1 to 2048; its LM head [49152, 576]: 0.45-0.81x of the blocked MKL
# product from M = 1 to 128 (benchmarks/README.md, "cpurest"). Not bitwise MKL's sums: greedy parity with HF is checked by
# tests/models (float32 sums in another order). The packed copies take the weights' size again,
# so they are capped: past ``TESSELLM_CPU_PACKED_WEIGHTS_MB`` (default 2048 MiB; 0 turns packing
# off) the remaining linears stay on ``F.linear``, and a large model does not double its memory.
PACK_HINT = 64

# The native RMSNorm (csrc/norm.c) takes at most this many values: below torch's reduction grain
# (32768) torch sums each row on one thread, in the order the kernel reproduces.
NORM_MAX_NUMEL = 32768


def norm_lanes(lib, n: int, eps: float) -> int:
    """The vector width (16 or 8 lanes) with which ``tl_add_rms_norm`` reproduces torch's float32
    RMSNorm bitwise for rows of ``n`` (torch's sum kernel may run narrower vectors than its CPU
    capability says: 8 lanes measured on an AVX-512 host with torch 2.13), or 0 when neither
    does. Probed once per width on random rows of several magnitudes, with and without a
    residual, against ``F.rms_norm`` (as many rows as the size limit allows, up to 64: a wrong
    width matched one random row of 576 in ~1/4 of draws, never 50)."""
    g = torch.Generator().manual_seed(n)
    count = max(1, min(64, NORM_MAX_NUMEL // n))
    rows = [torch.randn(count, n, generator=g) * s for s in (1e-3, 1.0, 30.0)]
    weight = torch.randn(n, generator=g)
    for lanes in (8, 16):
        ok = True
        for x in rows:
            res, out, sum_out = x.flip(0).contiguous(), torch.empty_like(x), torch.empty_like(x)
            rc = lib.tl_add_rms_norm(x.data_ptr(), res.data_ptr(), sum_out.data_ptr(), weight.data_ptr(),
                                     out.data_ptr(), x.shape[0], n, eps, lanes)
            if rc or not torch.equal(out, F.rms_norm(x + res, (n,), weight, eps)):
                ok = False
                break
        if ok:
            return lanes
    return 0


# The native SiLU-and-mul (csrc/silu_mul.c) takes at most this many outputs: below torch's
# grain (32768) torch runs the whole tensor as one chunk, so each row's scalar tail (the values
# past its last whole vector block) sits where the kernel puts it.
SILU_MAX_NUMEL = 32767


def silu_block(lib, d: int) -> int:
    """The vector step (32 or 16 values) with which ``tl_silu_and_mul`` reproduces torch's
    float32 ``F.silu(gate) * up`` bitwise for rows of ``d``, or 0 when neither does. Probed once
    per width on rows of several magnitudes (past exp's limits too), against the reference."""
    g = torch.Generator().manual_seed(d)
    count = max(1, min(16, SILU_MAX_NUMEL // d))
    probes = [torch.randn(count, 2 * d, generator=g) * s for s in (1e-3, 1.0, 8.0, 120.0)]
    for block in (32, 16):
        ok = True
        for x in probes:
            out = torch.empty(count, d)
            if (lib.tl_silu_and_mul(x.data_ptr(), out.data_ptr(), count, d, block)
                    or not torch.equal(out, F.silu(x[:, :d]) * x[:, d:])):
                ok = False
                break
        if ok:
            return block
    return 0


class CpuOps(ReferenceOps):
    fused_moe = staticmethod(fused_moe_grouped)  # the sort-and-group MoE (cpu/moe.py)
    fused_moe_activations = ("silu", "swiglu_oai", "relu2")  # and expert biases (reference/moe.py)
    fused_experts = staticmethod(grouped_experts)  # the same with the routing given
    fused_moe_block_fp8 = True  # block-wise fp8 experts dequantized per touched expert
    fused_moe_expert_map = True  # expert parallelism: other ranks' experts' pairs skipped
    fused_moe_int4 = True  # AWQ / GPTQ int4 experts dequantized per touched expert
    fused_moe_int4_act_order = True  # GPTQ act order (w13_perm): the inputs gathered per expert
    fused_moe_bnb4 = True  # bitsandbytes 4-bit experts dequantized per touched expert

    def __init__(self):
        # id(weight) -> (weight, its version counter when packed, the packed weight)
        self._packed: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._packed_bytes = 0
        self._pack_limit = envs.cpu_packed_weights_bytes()
        self.onednn = torch.backends.mkldnn.is_available()
        self._native = False  # the native kernels (native.load()), looked up on first use
        self._norm_lanes: dict[int, int] = {}  # row width -> norm_lanes() (0: torch's path)
        self._silu_block: dict[int, int] = {}  # row width -> silu_block() (0: torch's path)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
        """``x @ weight.T (+ bias)``; float32 products on oneDNN's packed weight (``_pack``),
        the LM head included; where no packed copy can be used, products of at least ``MIN_M``
        rows and ``MIN_N`` columns (the LM head) run in column blocks into one output, the rest
        in one ``F.linear``."""
        n = weight.shape[0]
        if x.dim() != 2 or x.dtype != torch.float32 or weight.dtype != torch.float32:
            return F.linear(x, weight, bias)
        packed = self._pack(weight)
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")
        if n < MIN_N or bias is not None or x.shape[0] < MIN_M:
            return F.linear(x, weight, bias)
        out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
        for start in range(0, n, BLOCK_N):
            torch.mm(x, weight[start:start + BLOCK_N].t(), out=out[:, start:start + BLOCK_N])
        return out

    # The norm-fold pair (plugin API 24): a residual-add RMSNorm split between the product
    # before it and the one after it, in torch around this backend's ``linear``. Declared so
    # the decoder's fold path and its conformance cases run here; not taken by default (no
    # ``norm_fold_default``: on the CPU the native fused add-norm is one call already, and the
    # split adds elementwise ops to both products; ``TESSELLM_NORM_FOLD2=1`` asks for it).

    def linear_add_rms_norm_fold(self, x, weight, residual, norm_weight, bias=None):
        """The producer's half: ``reference.ops.linear_add_rms_norm_fold`` on ``linear``'s
        product (rounded to x's dtype): ``(round(h * norm_weight), sumsq, h)``."""
        return fold_out(self.linear(x, weight, bias), residual, norm_weight)

    def linear_rms_scaled(self, x, weight, sumsq, eps: float, bias=None,
                          silu_and_mul: bool = False):
        """The consumer's half: the float32 product (``linear``'s for float32 operands) times
        ``rsqrt(sum(sumsq) / K + eps)``, plus the bias, rounded to x's dtype, then
        ``silu_and_mul`` if asked (``reference.ops.linear_rms_scaled``)."""
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            y = self.linear(x, weight)
        else:
            y = F.linear(x.float(), weight.float())
        y = rms_scaled(y, x, sumsq, eps, bias, False)
        return self.silu_and_mul(y) if silu_and_mul else y

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """float32: the native kernel (``csrc/norm.c``) where it takes ``x``, else ``F.rms_norm``,
        one aten call for the reference's five; both bitwise the reference's result (checked in
        tests/backends/test_cpu_ops.py)."""
        if x.dtype != torch.float32 or weight.dtype != torch.float32:
            return super().rms_norm(x, weight, eps)
        out = self._native_norm(x, None, weight, eps)
        if out is not None:
            return out[0]
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def fused_add_rms_norm(self, x, residual, weight, eps):
        """``(rms_norm(x + residual), x + residual)``: float32 rows in one native call
        (``_native_norm``), else the reference (an add, then ``rms_norm``)."""
        out = self._native_norm(x, residual, weight, eps)
        if out is not None:
            return out
        return super().fused_add_rms_norm(x, residual, weight, eps)

    def _native_norm(self, x, residual, weight, eps) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(norm, residual sum)`` by ``tl_add_rms_norm``, or None where it does not apply: no
        native library, under ``torch.compile`` or autograd, not contiguous float32, more than
        ``NORM_MAX_NUMEL`` values (torch may then sum a row over threads), or a row width whose
        sum order the library could not match bitwise (``_norm_lanes``)."""
        lib = self._native_lib()
        if (lib is None or x.dtype != torch.float32 or weight.dtype != torch.float32
                or x.numel() > NORM_MAX_NUMEL or not x.is_contiguous() or not weight.is_contiguous()
                or x.requires_grad or torch.compiler.is_compiling()):
            return None
        if residual is not None and (residual.dtype != torch.float32 or residual.shape != x.shape
                                     or not residual.is_contiguous()):
            return None
        n = x.shape[-1]
        lanes = self._norm_lanes.get(n)
        if lanes is None:
            lanes = self._norm_lanes[n] = norm_lanes(lib, n, eps)
        if not lanes or weight.shape != (n,):
            return None
        out = torch.empty_like(x)
        res = None if residual is None else torch.empty_like(x)
        rc = lib.tl_add_rms_norm(x.data_ptr(), 0 if res is None else residual.data_ptr(),
                                 0 if res is None else res.data_ptr(), weight.data_ptr(),
                                 out.data_ptr(), x.numel() // n, n, eps, lanes)
        return None if rc else (out, res)

    def rotary_embedding(self, positions, q, k, cos_sin_cache, head_size: int):
        """float32 q/k rows with unit inner stride: rotated in place by the native kernel
        (``csrc/paged_decode.c``), one call for the reference's dozen ops, bitwise its result
        (the products rounded before the sums, as torch's); anything else: the reference."""
        lib = self._native_lib()
        if (lib is None or torch.compiler.is_compiling() or q.requires_grad or k.requires_grad
                or any(t.dtype != torch.float32 or t.stride(-1) != 1 for t in (q, k, cos_sin_cache))
                or q.dim() != 2 or k.dim() != 2 or q.shape[1] % head_size or k.shape[1] % head_size
                or positions.dtype != torch.int64):
            return super().rotary_embedding(positions, q, k, cos_sin_cache, head_size)
        positions = positions.contiguous()
        rc = lib.tl_rotary_neox(q.data_ptr(), q.stride(0), q.shape[1] // head_size, k.data_ptr(), k.stride(0),
                                k.shape[1] // head_size, positions.data_ptr(), cos_sin_cache.data_ptr(),
                                cos_sin_cache.stride(0), q.shape[0], head_size, cos_sin_cache.shape[-1],
                                torch.get_num_threads())
        if rc:
            return super().rotary_embedding(positions, q, k, cos_sin_cache, head_size)
        return q, k

    def _native_lib(self):
        if self._native is False:
            self._native = native.load()
        return self._native

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up``: float32 rows of at most ``SILU_MAX_NUMEL`` outputs in one native
        call (``csrc/silu_mul.c``; decode: one row of SmolLM2's 1,536 ~10 -> ~5 us), else into
        one new tensor by aten (the reference allocates two; [2048, 2 x 1536] float32, one
        thread: 4.0-5.1 -> 3.5-3.7 ms). Both bitwise the reference's result."""
        if torch.compiler.is_compiling() or x.requires_grad:
            return super().silu_and_mul(x)
        d = x.shape[-1] // 2
        out = self._native_silu(x, d)
        if out is not None:
            return out
        out = torch.ops.aten.silu.out(x[..., :d], out=x.new_empty(x.shape[:-1] + (d,)))
        return out.mul_(x[..., d:])

    def _native_silu(self, x: torch.Tensor, d: int) -> Optional[torch.Tensor]:
        """``tl_silu_and_mul``'s result, or None where it does not apply: no native library,
        not contiguous float32, more than ``SILU_MAX_NUMEL`` outputs, or a row width whose
        result the library could not match bitwise (``silu_block``)."""
        lib = self._native_lib()
        if (lib is None or x.dtype != torch.float32 or not x.is_contiguous() or x.shape[-1] != 2 * d
                or x.numel() > 2 * SILU_MAX_NUMEL or d == 0):
            return None
        block = self._silu_block.get(d)
        if block is None:
            block = self._silu_block[d] = silu_block(lib, d)
        if not block:
            return None
        out = x.new_empty(x.shape[:-1] + (d,))
        rc = lib.tl_silu_and_mul(x.data_ptr(), out.data_ptr(), x.numel() // (2 * d), d, block)
        return None if rc else out

    def _pack(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """oneDNN's blocked copy of a 2-D float32 weight, made once and made again when the
        weight changes in place (its version counter moves); None where it cannot be used
        (no oneDNN, under ``torch.compile``, inference-mode or non-contiguous weights)."""
        if (not self.onednn or weight.dim() != 2 or not weight.is_contiguous()
                or torch.compiler.is_compiling() or weight.is_inference()):
            return None
        version = weight._version
        entry = self._packed.get(id(weight))
        if entry is None or entry[0] is not weight or entry[1] != version:
            size = weight.numel() * weight.element_size()
            held = entry[0].numel() * entry[0].element_size() if entry is not None else 0
            if self._packed_bytes - held + size > self._pack_limit:
                return None  # over the cap: this weight stays on F.linear
            entry = (weight, version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_HINT))
            self._packed[id(weight)] = entry
            self._packed_bytes += size - held
        return entry[2]


# Columns per chunk of the two-pass argmax. torch's CPU argmax over a row is a scalar loop
# (measured on 2 cores, [64, 49152] float32: ~8 ms at one thread, amax ~0.5 ms).
ARGMAX_CHUNK = 1024
# Fewer rows: torch's argmax (one row is ~40 us, and it opens no OpenMP region, which on a
# contended machine can stall for a scheduler slice: measured 12 ms for the two-pass at 1 row).
ARGMAX_MIN_ROWS = 4


def chunked_argmax(x: torch.Tensor, divisor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(x / divisor).argmax(-1)``, exactly (ties and NaN to the lowest index, as torch), in two
    passes: the vectorised ``amax`` of each ``ARGMAX_CHUNK`` columns, then ``argmax`` over the
    chunk maxima (the first chunk holding the row's maximum) and within that chunk only::

        row  [3 9 1 | 9 2 0 | 4]   chunk maxima [9 9 4] -> chunk 0 -> column 1
    """
    if divisor is not None:
        x = x / divisor
    rows, n = x.shape[0], x.shape[-1]
    if x.dim() != 2 or n < 2 * ARGMAX_CHUNK or rows < ARGMAX_MIN_ROWS:
        return x.argmax(dim=-1)
    full = n // ARGMAX_CHUNK * ARGMAX_CHUNK
    maxima = x[:, :full].reshape(rows, -1, ARGMAX_CHUNK).amax(dim=-1)  # [rows, chunks]
    if full < n:
        maxima = torch.cat([maxima, x[:, full:].amax(dim=-1, keepdim=True)], dim=1)
    start = maxima.argmax(dim=-1) * ARGMAX_CHUNK  # [rows]
    # Past the last column, the window repeats it: later than the real one, never chosen first.
    cols = (start[:, None] + torch.arange(ARGMAX_CHUNK, device=x.device)).clamp_(max=n - 1)
    return start + x.gather(1, cols).argmax(dim=-1)


class CpuLogitsOps(ReferenceLogitsOps):
    """The reference bitmask, plus ``chunked_argmax`` for the sampler (greedy rows and the
    exponential race of random sampling)."""

    name = "cpu"
    argmax = staticmethod(chunked_argmax)
