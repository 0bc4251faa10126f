"""Fused elementwise ops in Triton: RMSNorm (plain and residual-add), NeoX rotary, SiLU-and-mul.

Each matches ``backends/reference/ops.py`` including its rounding points: RMSNorm normalizes in
float32, rounds to x's dtype, then multiplies by the weight; rotary rounds cos/sin and each
product to x's dtype like the torch expression does; SiLU rounds its output before the multiply.
Rows are flattened to ``[rows, hidden]``; the last dimension must be contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessellm import envs
from tessellm.kernels.activation import _silu_and_mul_kernel, launch_silu_and_mul_fp8
from tessellm.kernels.gemm.decode_gemm import (DecodeGemmConfig, decode_gemm,
                                                decode_gemm_silu_and_mul)
from tessellm.kernels.gemm.gemv import (GEMV_FOLD_MAX_M, gemv, gemv_silu_and_mul,
                                        gemv_then_add_rms_norm)
from tessellm.kernels.gemm.gemv_fold import gemv_add_rms_norm_fold, gemv_rms_scaled
from tessellm.kernels.gemm.norm_epilogue import norm_epilogue_applies
from tessellm.kernels.gemm.norm_fold import (consume_applies, fold_applies, fold_reference,
                                             rms_scaled_reference)
from tessellm.kernels.host_ints import cdiv, next_power_of_2
from tessellm.kernels.launch import fast_launch
from tessellm.kernels.norm import (_rows, add_norm_buffers, launch_rms_norm, launch_rms_norm_fp8,
                                   promoted, residual_buffers, shaped_as)
from tessellm.kernels.op_flags import FUSED_OPS_FLAGS, drop_unowned_flags
from tessellm.kernels.pdl import pdl_args
from tessellm.kernels.rotary import _rotary_kernel
from tessellm.quantization.packed import Fp8Activation


class TritonOps:
    """``FusedOps`` through Triton kernels (see module docstring for the rounding contract)."""

    max_hidden = 65536  # one program holds a whole row
    # ``ExpertActivation.kind``s (and expert biases) fused_moe / fused_experts take
    # (``reference/moe.py``): the grouped GEMMs' epilogue (``kernels/moe/fused_moe.py``)
    fused_moe_activations = ("silu", "swiglu_oai", "relu2")
    # block-wise fp8 experts (``block_shape``): dequantized tile by tile in the grouped GEMMs
    fused_moe_block_fp8 = True
    # expert parallelism (``expert_map``): other ranks' experts' pairs skipped by the alignment
    fused_moe_expert_map = True
    # AWQ / GPTQ int4 experts (``int4``): codes dequantized tile by tile in the grouped GEMMs
    fused_moe_int4 = True
    # GPTQ act-order int4 experts (``w13_perm``): the first GEMM gathers x in each expert's order
    fused_moe_int4_act_order = True
    # bitsandbytes 4-bit experts (``bnb4_code``): the decode kernels read the packed codes
    # (``kernels/moe/decode_bnb4.py``), more tokens dequantize a chunk for the grouped GEMMs
    fused_moe_bnb4 = True

    def __init_subclass__(cls, **kwargs):
        """A subclass (a plugin's ops may build on these) that defines one of an optional
        flag's ops itself (``op_flags.FUSED_OPS_FLAGS``) without setting the flag in its own
        body gets the flag off: one written for API 20 with its own ``mamba_chunk_scan`` would
        otherwise be handed ``snapshots`` (API 21), a keyword it never took."""
        super().__init_subclass__(**kwargs)
        drop_unowned_flags(cls, FUSED_OPS_FLAGS)

    def fused_moe(self, hidden, router_logits, w13, w2, top_k, scoring="softmax",
                  renormalize=True, w13_scale=None, w2_scale=None, **variant):
        """Grouped GEMMs over expert-sorted token blocks (``tessellm/kernels/moe``);
        ``variant``: keyword-only ``activation``, ``w13_bias``, ``w2_bias``, ``block_shape``,
        ``expert_map``, ``int4`` with ``w13_zeros`` / ``w2_zeros`` (and ``w13_perm``),
        ``bnb4_code``."""
        from tessellm.kernels.moe import fused_moe

        return fused_moe(hidden, router_logits, w13, w2, top_k, scoring, renormalize,
                         w13_scale, w2_scale, **variant)

    def fused_experts(self, hidden, topk_weights, topk_ids, w13, w2, w13_scale=None,
                      w2_scale=None, **variant):
        """``fused_moe`` with the routing given: the same grouped GEMMs (``fused_moe_triton``)."""
        from tessellm.kernels.moe import fused_moe_triton

        return fused_moe_triton(hidden, topk_weights, topk_ids, w13, w2, w13_scale, w2_scale,
                                **variant)

    def gated_rms_norm(self, y, z, weight, group_size, eps, mode="gate_then_norm"):
        """The recurrent mixers' gated RMSNorm in one launch (``kernels/gated_norm.py``)."""
        from tessellm.kernels.gated_norm import gated_rms_norm

        return gated_rms_norm(y, z, weight, group_size, eps, mode)

    # Mamba2 mixer ops (``FusedOps``' ``mamba_*``): ``kernels/mamba`` says which run in Triton.
    supports_mamba2 = True

    mamba_strided_inputs = True  # x and dt as row-strided views (plugin API 17)

    # the conv's state launch keeps ``batch.state_saves`` itself, given the pool (plugin API 23)
    mamba_conv_state_saves = True

    def mamba_conv1d(self, x, weight, bias, conv_state, batch, activation="silu", snapshots=None):
        from tessellm.kernels.mamba import mamba_conv1d

        return mamba_conv1d(x, weight, bias, conv_state, batch, activation, snapshots=snapshots)

    # the scan keeps ``batch.state_saves`` itself, given the pool (plugin API 21)
    mamba_state_saves = True

    def mamba_chunk_scan(self, x, dt, A, B, C, D, dt_bias, ssm_state, batch, chunk_size,
                         dt_limit=(0.0, float("inf")), snapshots=None):
        from tessellm.kernels.mamba import mamba_chunk_scan

        return mamba_chunk_scan(x, dt, A, B, C, D, dt_bias, ssm_state, batch, chunk_size, dt_limit,
                                snapshots=snapshots)

    def mamba_state_update(self, x, dt, A, B, C, D, dt_bias, ssm_state, state_indices,
                           dt_limit=(0.0, float("inf"))):
        from tessellm.kernels.mamba import mamba_state_update

        return mamba_state_update(x, dt, A, B, C, D, dt_bias, ssm_state, state_indices, dt_limit)

    # Speculative decoding's verify ops (optional ``FusedOps`` members): one launch per op over
    # every verify sequence's tokens, the state after each token kept (``kernels/mamba/verify.py``,
    # ``kernels/gated_delta/verify.py``); without them the engine would run the one-token
    # kernels once per token position, with a state copy before each. They read only device
    # tensors: a captured verify step replays them.
    recurrent_verify_graphs = True

    def mamba_conv1d_verify(self, x, weight, bias, conv_state, batch, activation="silu"):
        from tessellm.kernels.mamba import mamba_conv1d_verify

        return mamba_conv1d_verify(x, weight, bias, conv_state, batch, activation)

    def mamba_state_update_verify(self, x, dt, A, B, C, D, dt_bias, ssm_state, batch,
                                  dt_limit=(0.0, float("inf"))):
        from tessellm.kernels.mamba import mamba_state_update_verify

        return mamba_state_update_verify(x, dt, A, B, C, D, dt_bias, ssm_state, batch, dt_limit)

    def gated_delta_verify(self, q, k, v, g, beta, state, batch, scale):
        from tessellm.kernels.gated_delta import gated_delta_verify

        return gated_delta_verify(q, k, v, g, beta, state, batch, scale)

    # The gated delta rule ops (``FusedOps``' ``gated_delta_*``, ``kernels/gated_delta``).
    supports_gated_delta = True

    # the chunk kernel keeps ``batch.state_saves`` itself, given the pool (plugin API 22)
    gated_delta_state_saves = True

    def gated_delta_chunk(self, q, k, v, g, beta, state, batch, scale, snapshots=None):
        from tessellm.kernels.gated_delta import gated_delta_chunk

        return gated_delta_chunk(q, k, v, g, beta, state, batch, scale, snapshots=snapshots)

    def gated_delta_step(self, q, k, v, g, beta, state, state_indices, scale):
        from tessellm.kernels.gated_delta import gated_delta_step

        return gated_delta_step(q, k, v, g, beta, state, state_indices, scale)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)
        out = torch.empty(x2.shape, dtype=promoted(weight.dtype, x.dtype), device=x.device)
        self._launch_norm(x2, None, weight, out, None, eps)
        return shaped_as(out, x)

    def fused_add_rms_norm(self, x, residual, weight, eps):
        """Returns ``(rms_norm(x + residual), x + residual)``; the sum overwrites ``residual``
        in place when its dtype and layout allow."""
        x2, r2, out, new_res, result = add_norm_buffers(x, residual, weight)
        self._launch_norm(x2, r2, weight, out, new_res, eps)
        return result

    def _launch_norm(self, x2, r2, weight, out, new_res, eps):
        self._check_hidden(x2)
        launch_rms_norm(x2, r2, weight, out, new_res, eps)

    def _check_hidden(self, x2):
        if x2.shape[-1] > self.max_hidden:
            raise ValueError(f"Triton RMSNorm handles rows up to {self.max_hidden}, got "
                             f"{x2.shape[-1]}.")

    # -- the fp8 activation fold (optional FusedOps members): the op's output quantized per
    # token in the same kernel, bitwise the op then ``gemm/fp8.quantize_fp8_rows``.

    def rms_norm_fp8(self, x, weight, eps, fp8_dtype) -> Fp8Activation:
        """``rms_norm(x, weight, eps)`` quantized to ``fp8_dtype`` per token (2-D x)."""
        x2 = _rows(x)
        self._check_hidden(x2)
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        q, s = launch_rms_norm_fp8(x2, None, weight, None, eps, out_dtype, fp8_dtype)
        return Fp8Activation(q, s, out_dtype)

    def fused_add_rms_norm_fp8(self, x, residual, weight, eps, fp8_dtype):
        """``fused_add_rms_norm`` whose normed output comes quantized: ``(Fp8Activation, x +
        residual)``; the sum overwrites ``residual`` in place when its dtype and layout allow."""
        x2, r2, new_res, res_result = residual_buffers(x, residual)
        self._check_hidden(x2)
        out_dtype = torch.promote_types(weight.dtype, new_res.dtype)
        q, s = launch_rms_norm_fp8(x2, r2, weight, new_res, eps, out_dtype, fp8_dtype)
        return Fp8Activation(q, s, out_dtype), res_result

    def silu_and_mul_fp8(self, x, fp8_dtype) -> Fp8Activation:
        """``silu_and_mul(x)`` quantized to ``fp8_dtype`` per token (2-D x)."""
        q, s = launch_silu_and_mul_fp8(_rows(x), fp8_dtype)
        return Fp8Activation(q, s, x.dtype)

    def rotary_embedding(self, positions, q, k, cos_sin_cache, head_size: int):
        """NeoX rotation, in place on ``q`` ``[T, H*D]`` and ``k`` ``[T, KVH*D]`` (or 3-D), of
        the first ``R = cos_sin_cache.shape[-1]`` dims of each head (``R < D``: partial rotary;
        the kernel touches only dims ``0..R`` through the head stride, the rest stay)."""
        rotary_dim = cos_sin_cache.shape[-1]
        if rotary_dim % 2 or rotary_dim > head_size:
            raise ValueError(f"cos_sin_cache width {rotary_dim} must be even and at most "
                             f"head_size {head_size}.")
        num_tokens = q.shape[0]
        if num_tokens == 0:
            return q, k
        q3 = q.view(num_tokens, -1, head_size)
        k3 = k.view(num_tokens, -1, head_size)
        assert q3.stride(-1) == 1 and k3.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
        half = rotary_dim // 2
        hq, hk = q3.shape[1], k3.shape[1]
        fast_launch(_rotary_kernel)(  # (kernels/launch.py: no per-call binding on a hit)
            (num_tokens,), (positions.reshape(-1), q3, k3, cos_sin_cache),
            (q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), cos_sin_cache.stride(0)),
            {"NUM_Q_HEADS": hq, "Q_HEADS_P2": next_power_of_2(hq), "NUM_K_HEADS": hk,
             "K_HEADS_P2": next_power_of_2(hk), "HALF": half, "HALF_P2": next_power_of_2(half),
             "num_warps": 4, **pdl_args(q.device)})
        return q, k

    # Dense products the GEMV (``gemv.py``) runs faster than cuBLAS: 1 row at any width, 2 rows
    # below this many outputs (H200, Llama-8B shapes, benchmarks/kernels/gemv_bench.py).
    gemv_two_rows_max_n = 8192

    # TESSELLM_DECODE_GEMM's plain product stays off the LM head (more outputs than this;
    # TESSELLM_DECODE_GEMM_MAX_N sets another bound).
    decode_gemm_max_n = 32768

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
        """``x @ weight.T + bias``: the GEMV at decode's 1-2 rows in bf16/fp16; under
        ``TESSELLM_DECODE_GEMM`` the Triton tile GEMM at 3 to its most rows (``decode_gemm``);
        else torch's."""
        if self._gemv_applies(x, weight):
            return gemv(x, weight, bias)
        if self._decode_gemm_applies(x, weight, silu=False):
            return decode_gemm(x, weight, bias)
        return F.linear(x, weight, bias)

    def decode_gemm_rows(self) -> int:
        """The most rows ``linear_silu_and_mul`` runs as one product: the GEMV's 2, or
        TESSELLM_DECODE_GEMM's row limit where its SiLU epilogue is on (``tessellm.envs``,
        read once per ops object)."""
        _, silu, rows = self._decode_gemm_setting()
        return rows if silu else GEMV_FOLD_MAX_M

    def _decode_gemm_setting(self) -> tuple[bool, bool, int]:
        setting = self.__dict__.get("_decode_gemm")
        if setting is None:
            setting = self.__dict__["_decode_gemm"] = envs.decode_gemm()
            tiles = envs.decode_gemm_silu_tiles()
            self.__dict__["_decode_gemm_silu_config"] = (
                None if tiles is None else DecodeGemmConfig(*tiles))
            max_n = envs.decode_gemm_max_n()
            if max_n is not None:
                self.decode_gemm_max_n = max_n
        return setting

    def _decode_gemm_applies(self, x: torch.Tensor, weight: torch.Tensor, silu: bool) -> bool:
        plain, fold, rows = self._decode_gemm_setting()
        if not (fold if silu else plain):
            return False
        return (x.dim() == 2 and 2 < x.shape[0] <= rows and weight.dtype == x.dtype
                and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and weight.dim() == 2 and weight.stride(1) == 1
                and (silu or weight.shape[0] <= self.decode_gemm_max_n))

    def _gemv_applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16)
                and weight.dtype == x.dtype
                and (x.shape[0] == 1
                     or (x.shape[0] == 2 and weight.shape[0] < self.gemv_two_rows_max_n)))

    def linear_silu_and_mul(self, x: torch.Tensor, weight: torch.Tensor,
                            bias=None) -> torch.Tensor:
        """``silu_and_mul(linear(x, weight, bias))`` for a stacked ``[gate; up]`` weight: one
        launch where ``linear`` takes the GEMV (the activation in its epilogue,
        ``gemv.gemv_silu_and_mul``, bitwise the two launches), else those two."""
        if (x.dim() == 2 and x.shape[0] <= GEMV_FOLD_MAX_M and weight.shape[0] % 2 == 0
                and self._gemv_applies(x, weight)):
            return gemv_silu_and_mul(x, weight, bias)
        if weight.shape[0] % 2 == 0 and self._decode_gemm_applies(x, weight, silu=True):
            return decode_gemm_silu_and_mul(x, weight, bias,
                                            self.__dict__["_decode_gemm_silu_config"])
        return self.silu_and_mul(self.linear(x, weight, bias))

    def linear_add_rms_norm(self, x: torch.Tensor, weight: torch.Tensor,
                            residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            bias=None):
        """``fused_add_rms_norm(linear(x, weight, bias), residual, norm_weight, eps)``: one
        launch where ``linear`` takes the one-row GEMV (the norm in its last program,
        ``gemm/norm_epilogue.py``, bitwise the two launches), else those two. Returns
        ``(normed, residual)``, the residual updated in place where it can be."""
        if (x.dim() == 2 and x.shape[0] == 1 and self._gemv_applies(x, weight)
                and norm_epilogue_applies(x, weight.shape[0], residual, norm_weight)):
            return gemv_then_add_rms_norm(x, weight, residual, norm_weight, eps, bias)
        return self.fused_add_rms_norm(self.linear(x, weight, bias), residual, norm_weight, eps)

    def linear_add_rms_norm_fold(self, x: torch.Tensor, weight: torch.Tensor,
                                 residual: torch.Tensor, norm_weight: torch.Tensor, bias=None):
        """The producer's half of a residual-add RMSNorm split between two products
        (``gemm/norm_fold.py``): at one 16-bit row the GEMV stores the new residual, ``round(h *
        norm_weight)`` and a partial sum of squares a program in its epilogue
        (``gemv_fold.gemv_add_rms_norm_fold``); else ``linear`` and the same in torch. Returns
        ``(xg, sumsq, residual)``, the residual updated in place where it can be."""
        if (x.dim() == 2 and x.shape[0] == 1 and self._gemv_applies(x, weight)
                and fold_applies(x, weight.shape[0], residual, norm_weight)):
            xg, sumsq = gemv_add_rms_norm_fold(x, weight, residual, norm_weight, bias)
            return xg, sumsq, residual
        return fold_reference(self.linear(x, weight, bias), residual, norm_weight)

    def linear_rms_scaled(self, x: torch.Tensor, weight: torch.Tensor, sumsq: torch.Tensor,
                          eps: float, bias=None, silu_and_mul: bool = False) -> torch.Tensor:
        """The consumer's half: ``(x @ weight.T) * rsqrt(sum(sumsq) / K + eps) + bias`` (then
        ``silu_and_mul`` if asked): at one 16-bit row the GEMV with the scale in its epilogue
        (``gemv_fold.gemv_rms_scaled``), else torch's product scaled."""
        if (x.dim() == 2 and x.shape[0] == 1 and self._gemv_applies(x, weight)
                and consume_applies(x, sumsq) and not (silu_and_mul and weight.shape[0] % 2)):
            return gemv_rms_scaled(x, weight, sumsq, eps, bias, silu_and_mul)
        y = rms_scaled_reference(self.linear(x, weight), sumsq, x.shape[-1], eps, bias)
        y = y.to(x.dtype)
        return self.silu_and_mul(y) if silu_and_mul else y

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        d = x2.shape[1] // 2
        out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
        if x2.shape[0]:
            block = min(1024, next_power_of_2(d))
            fast_launch(_silu_and_mul_kernel)(  # (kernels/launch.py: no binding on a hit)
                (x2.shape[0], cdiv(d, block)), (x2, out), (d, x2.stride(0), out.stride(0)),
                {"BLOCK": block, "num_warps": 4, **pdl_args(x.device)})
        return out if x.dim() == 2 else out.view(*x.shape[:-1], d)
