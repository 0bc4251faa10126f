"""Fused elementwise ops in Triton: RMSNorm (plain and residual-add), NeoX rotary, SiLU-and-mul.

Each matches ``backends/reference/ops.py`` including its rounding points: RMSNorm normalizes in
float32, rounds to x's dtype, then multiplies by the weight; rotary rounds cos/sin and each
product to x's dtype like the torch expression does; SiLU rounds its output before the multiply.
Rows are flattened to ``[rows, hidden]``; the last dimension must be contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tessellm import envs
from tessellm.backends.cuda.pdl import pdl_args, pdl_start


@triton.jit
def add_rms_norm_row(x, res_ptrs, res_out_ptrs, w_ptr, out_ptrs, cols, mask, hidden, eps):
    """The residual-add RMSNorm of one row: ``x`` (float32) + the row at ``res_ptrs`` is
    stored (rounded) at ``res_out_ptrs``, normalized, rounded again, times the weight, and
    stored at ``out_ptrs``. Shared with the fused all-reduce (``allreduce_norm.py``)."""
    r = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    xr = (x + r).to(res_out_ptrs.dtype.element_ty)
    tl.store(res_out_ptrs, xr, mask=mask)
    xf = xr.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / hidden + eps)
    xn = (xf * rstd).to(res_out_ptrs.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (w * xn).to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, hidden, eps,
                     stride_x, stride_res, stride_out, stride_res_out,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """One row per program. With a residual: r = x + res is stored to res_out, then normed."""
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        add_rms_norm_row(x, res_ptr + row * stride_res + cols,
                         res_out_ptr + row * stride_res_out + cols, w_ptr,
                         out_ptr + row * stride_out + cols, cols, mask, hidden, eps)
    else:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / hidden + eps)
        xn = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (w * xn).to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def rope_halves(x1, x2, cos, sin, dt: tl.constexpr):
    """NeoX rotation of a head's halves ``x1``, ``x2`` (any dtype; rounded like torch's ``dt``
    arithmetic). Returns ``(x1 cos - x2 sin, x2 cos + x1 sin)`` in ``dt``; ``cos``/``sin``
    broadcast against the halves. Shared with the attention kernel's fused rotary cache write.
    """
    # Products of two 16-bit floats are exact in float32, so rounding each float32 product to
    # dt reproduces torch's 16-bit arithmetic bit for bit (and keeps bf16 math off the Triton
    # interpreter, which cannot do arithmetic on bf16).
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    c = cos.to(dt).to(tl.float32)
    s = sin.to(dt).to(tl.float32)
    o1 = (x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)
    o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt)


@triton.jit
def rotate_heads(x_ptr, row, stride_t, stride_h, cos, sin,
                 NUM_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HALF: tl.constexpr,
                 HALF_P2: tl.constexpr):
    """Rotates the ``NUM_HEADS`` heads of token ``row`` in place; ``cos``/``sin``: ``[HALF_P2]``."""
    h = tl.arange(0, HEADS_P2)[:, None]
    j = tl.arange(0, HALF_P2)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    ptr = x_ptr + row * stride_t + h * stride_h + j
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    o1, o2 = rope_halves(x1, x2, cos[None, :], sin[None, :], x_ptr.dtype.element_ty)
    tl.store(ptr, o1, mask=mask)
    tl.store(ptr + HALF, o2, mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cache,
                   NUM_Q_HEADS: tl.constexpr, Q_HEADS_P2: tl.constexpr,
                   NUM_K_HEADS: tl.constexpr, K_HEADS_P2: tl.constexpr,
                   HALF: tl.constexpr, HALF_P2: tl.constexpr, USE_PDL: tl.constexpr):
    """One token per program; rotates all its q and k heads in place."""
    pdl_start(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_P2)
    cos = tl.load(cache_ptr + pos * stride_cache + j, mask=j < HALF, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + j, mask=j < HALF, other=0.0)
    rotate_heads(q_ptr, t, stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, Q_HEADS_P2, HALF, HALF_P2)
    rotate_heads(k_ptr, t, stride_kt, stride_kh, cos, sin, NUM_K_HEADS, K_HEADS_P2, HALF, HALF_P2)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_out, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    a = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    silu = (a / (1.0 + tl.exp(-a))).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (silu * b).to(dt), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last]`` (a view when possible)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def add_norm_buffers(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
    """Rows and outputs of a residual-add RMSNorm: ``(x2, r2, out, new_res, result)``;
    ``new_res`` is ``r2`` itself (the sum overwrites the residual) when its dtype and layout
    allow, and ``result`` is what the op returns once a kernel has filled ``out``/``new_res``."""
    x2, r2 = _rows(x), _rows(residual)
    res_dtype = torch.promote_types(x.dtype, residual.dtype)
    in_place = res_dtype == residual.dtype and r2.data_ptr() == residual.data_ptr()
    new_res = r2 if in_place else torch.empty(r2.shape, dtype=res_dtype, device=x.device)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, res_dtype),
                      device=x.device)
    return x2, r2, out, new_res, (out.view(x.shape),
                                  residual if in_place else new_res.view(x.shape))


class TritonOps:
    """``FusedOps`` through Triton kernels (see module docstring for the rounding contract)."""

    max_hidden = 65536  # one program holds a whole row

    def fused_moe(self, hidden, router_logits, w13, w2, top_k, scoring="softmax",
                  renormalize=True, w13_scale=None, w2_scale=None):
        """Grouped GEMMs over expert-sorted token blocks (``tessellm/kernels/moe``)."""
        from tessellm.kernels.moe import fused_moe

        return fused_moe(hidden, router_logits, w13, w2, top_k, scoring, renormalize,
                         w13_scale, w2_scale)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)
        out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype),
                          device=x.device)
        self._launch_norm(x2, None, weight, out, None, eps)
        return out.view(x.shape)

    def fused_add_rms_norm(self, x, residual, weight, eps):
        """Returns ``(rms_norm(x + residual), x + residual)``; the sum overwrites ``residual``
        in place when its dtype and layout allow."""
        x2, r2, out, new_res, result = add_norm_buffers(x, residual, weight)
        self._launch_norm(x2, r2, weight, out, new_res, eps)
        return result

    def all_reduce_add_rms_norm(self, x, residual, weight, eps, tp):
        """``fused_add_rms_norm(tp.all_reduce(x), residual, weight, eps)`` in one kernel where
        the group has symmetric memory and x fits its buffers (``allreduce_norm.py``; CUDA
        only: not validated on ROCm)."""
        if x.is_cuda and torch.version.hip is None and envs.fused_all_reduce_norm():
            from tessellm.backends.cuda.allreduce_norm import workspace

            ws = workspace(tp, x.dtype, x.shape[-1])
            if ws is not None and ws.fits(x) and x.shape[-1] <= self.max_hidden:
                return ws(x, residual, weight, eps)
        return self.fused_add_rms_norm(tp.all_reduce(x), residual, weight, eps)

    def _launch_norm(self, x2, r2, weight, out, new_res, eps):
        rows, hidden = x2.shape
        if hidden > self.max_hidden:
            raise ValueError(f"Triton RMSNorm handles rows up to {self.max_hidden}, got {hidden}.")
        if rows == 0:
            return
        block = triton.next_power_of_2(hidden)
        has_res = r2 is not None
        _rms_norm_kernel[(rows,)](
            x2, r2 if has_res else x2, weight.contiguous(), out, new_res if has_res else out,
            hidden, eps, x2.stride(0), r2.stride(0) if has_res else 0, out.stride(0),
            new_res.stride(0) if has_res else 0, HAS_RESIDUAL=has_res, BLOCK=block,
            num_warps=min(16, max(1, block // 512)), **pdl_args(x2.device))

    def rotary_embedding(self, positions, q, k, cos_sin_cache, head_size: int):
        """NeoX rotation, in place on ``q`` ``[T, H*D]`` and ``k`` ``[T, KVH*D]`` (or 3-D)."""
        if cos_sin_cache.shape[-1] != head_size:
            raise ValueError(f"cos_sin_cache width {cos_sin_cache.shape[-1]} != head_size "
                             f"{head_size}: partial rotary is not supported by TritonOps.")
        num_tokens = q.shape[0]
        if num_tokens == 0:
            return q, k
        q3 = q.view(num_tokens, -1, head_size)
        k3 = k.view(num_tokens, -1, head_size)
        assert q3.stride(-1) == 1 and k3.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
        half = head_size // 2
        hq, hk = q3.shape[1], k3.shape[1]
        _rotary_kernel[(num_tokens,)](
            positions.reshape(-1), q3, k3, cos_sin_cache, q3.stride(0), q3.stride(1),
            k3.stride(0), k3.stride(1), cos_sin_cache.stride(0),
            NUM_Q_HEADS=hq, Q_HEADS_P2=triton.next_power_of_2(hq),
            NUM_K_HEADS=hk, K_HEADS_P2=triton.next_power_of_2(hk),
            HALF=half, HALF_P2=triton.next_power_of_2(half), num_warps=4, **pdl_args(q.device))
        return q, k

    # Dense products the GEMV (``gemv.py``) runs faster than cuBLAS: 1 row at any width, 2 rows
    # below this many outputs (H200, Llama-8B shapes, benchmarks/kernels/gemv_bench.py).
    gemv_two_rows_max_n = 8192

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
        """``x @ weight.T + bias``: the GEMV at decode's 1-2 rows in bf16/fp16, else torch's."""
        if (x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
                and (x.shape[0] == 1 or (x.shape[0] == 2 and weight.shape[0] < self.gemv_two_rows_max_n))):
            from tessellm.backends.cuda.gemv import gemv

            return gemv(x, weight, bias)
        return F.linear(x, weight, bias)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        d = x2.shape[1] // 2
        out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
        if x2.shape[0]:
            block = min(1024, triton.next_power_of_2(d))
            _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
                x2, out, d, x2.stride(0), out.stride(0), BLOCK=block, num_warps=4,
                **pdl_args(x.device))
        return out.view(*x.shape[:-1], d)
