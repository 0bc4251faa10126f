"""Reference fused ops in plain torch: RMSNorm, rotary embedding, SiLU-and-mul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessellm.backends.reference import gated_delta, mamba, recurrent_verify
from tessellm.backends.reference.moe import fused_experts_reference, fused_moe_reference
from tessellm.kernels.op_flags import FUSED_OPS_FLAGS, drop_unowned_flags
from tessellm.quantization.packed import Fp8Activation


class ReferenceOps:
    """Pure-torch ``FusedOps``. Computes norms in float32 like HF transformers does."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(dtype)

    def fused_add_rms_norm(self, x, residual, weight, eps):
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def rotary_embedding(self, positions, q, k, cos_sin_cache, head_size):
        """NeoX style: rotate the two halves of each head. cos_sin_cache: [max_pos, head_size]
        holding cos in the first half and sin in the second."""
        cos_sin = cos_sin_cache[positions]  # [T, D]
        cos, sin = cos_sin.chunk(2, dim=-1)  # [T, D/2] each
        return _rotate(q, cos, sin, head_size), _rotate(k, cos, sin, head_size)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]

    # ``ExpertActivation.kind``s (and expert biases) ``fused_moe`` takes (reference/moe.py).
    fused_moe_activations = ("silu", "swiglu_oai", "relu2")

    def __init_subclass__(cls, **kwargs):
        """A subclass that defines one of an optional flag's ops itself (``kernels/op_flags.
        FUSED_OPS_FLAGS``) without setting the flag in its own body gets the flag off: a flag
        inherited from here speaks for the reference's op, not for its replacement (a plugin of
        API 19 with its own ``fused_experts`` never saw API 20's ``w13_perm``)."""
        super().__init_subclass__(**kwargs)
        drop_unowned_flags(cls, FUSED_OPS_FLAGS)

    def fused_moe(self, hidden, router_logits, w13, w2, top_k: int, scoring: str = "softmax",
                  renormalize: bool = True, w13_scale=None, w2_scale=None, **variant):
        """``FusedOps.fused_moe``: the loop over experts (``reference/moe.py``); ``variant``:
        its keyword-only ``activation``, ``w13_bias``, ``w2_bias``."""
        return fused_moe_reference(hidden, router_logits, w13, w2, top_k, scoring, renormalize,
                                   w13_scale, w2_scale, **variant)

    # Block-wise fp8 experts (keyword ``block_shape``, reference/moe.py) are taken.
    fused_moe_block_fp8 = True
    # Expert parallelism (keyword ``expert_map``, reference/moe.py) is taken.
    fused_moe_expert_map = True
    # AWQ / GPTQ int4 experts (keywords ``int4``, ``w13_zeros``, ``w2_zeros``) are taken.
    fused_moe_int4 = True
    # GPTQ act-order int4 experts (keyword ``w13_perm``, plugin API 20) are taken.
    fused_moe_int4_act_order = True
    # bitsandbytes 4-bit experts (keyword ``bnb4_code``, plugin API 26) are taken.
    fused_moe_bnb4 = True

    def fused_experts(self, hidden, topk_weights, topk_ids, w13, w2, w13_scale=None,
                      w2_scale=None, **variant):
        """``FusedOps.fused_experts``: the loop over experts with the routing given;
        ``variant``: ``block_shape``."""
        return fused_experts_reference(hidden, topk_weights, topk_ids, w13, w2, w13_scale,
                                       w2_scale, **variant)

    # ``FusedOps``' Mamba2 mixer ops (``reference/mamba.py``): loops over the step's sequences.
    supports_mamba2 = True
    # x and dt may be row-strided views of the mixer's projection (plugin API 17)
    mamba_strided_inputs = True
    # the conv keeps ``batch.state_saves`` itself, given the pool (plugin API 23): the windows
    # before each offset, copied from its input (``state_saves.save_conv_states``)
    mamba_conv_state_saves = True
    mamba_conv1d = staticmethod(mamba.causal_conv1d)
    mamba_chunk_scan = staticmethod(mamba.ssd_chunk_scan)
    mamba_state_update = staticmethod(mamba.selective_state_update)

    # ``FusedOps``' gated delta rule ops (``reference/gated_delta.py``): the chunked WY form
    # for prefill chunks, one sequence at a time; the recurrence for decodes.
    supports_gated_delta = True
    gated_delta_chunk = staticmethod(gated_delta.gated_delta_chunk)
    gated_delta_step = staticmethod(gated_delta.gated_delta_step)

    # ``FusedOps``' optional verify ops (``reference/recurrent_verify.py``): a verify step of
    # speculative decoding keeps the recurrent state after each of its tokens; in a captured
    # verify step their indices are built on the device (``captured_positions``).
    recurrent_verify_graphs = True
    mamba_conv1d_verify = staticmethod(recurrent_verify.mamba_conv1d_verify)
    mamba_state_update_verify = staticmethod(recurrent_verify.mamba_state_update_verify)
    gated_delta_verify = staticmethod(recurrent_verify.gated_delta_verify)


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """The oracle of the optional ``FusedOps.linear_silu_and_mul``: ``silu_and_mul(x @
    weight.T + bias)`` for a stacked ``[gate; up]`` weight. A function, not a ``ReferenceOps``
    member: backends whose ops derive from ``ReferenceOps`` keep their own ``linear``."""
    return ReferenceOps().silu_and_mul(F.linear(x, weight, bias))


def linear_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                        norm_weight: torch.Tensor, eps: float, bias=None):
    """The oracle of the optional ``FusedOps.linear_add_rms_norm``: ``fused_add_rms_norm(x @
    weight.T + bias, residual, norm_weight, eps)``, the product rounded to x's dtype first:
    ``(normed, x W^T + b + residual)``. A function, not a ``ReferenceOps`` member."""
    return ReferenceOps().fused_add_rms_norm(F.linear(x, weight, bias), residual, norm_weight,
                                             eps)


def linear_add_rms_norm_fold(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                             norm_weight: torch.Tensor, bias=None):
    """The oracle of the optional ``FusedOps.linear_add_rms_norm_fold`` (the producer's half of
    a residual-add RMSNorm split between two products): with ``y = x @ weight.T + bias``
    rounded to x's dtype and ``h = y + residual`` rounded to the residual's, returns
    ``(round(h * norm_weight), sumsq, h)``: the next product's input in x's dtype, float32
    partial sums of ``h^2`` (here one) and the new residual."""
    return fold_out(F.linear(x, weight, bias), residual, norm_weight)


def fold_out(y: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor):
    """``linear_add_rms_norm_fold``'s result from the rounded product ``y``."""
    h = (y.float() + residual.float()).to(residual.dtype)
    hf = h.float()
    return (hf * norm_weight.float()).to(y.dtype), (hf * hf).sum().reshape(1), h


def linear_rms_scaled(x: torch.Tensor, weight: torch.Tensor, sumsq: torch.Tensor, eps: float,
                      bias=None, silu_and_mul: bool = False) -> torch.Tensor:
    """The oracle of the optional ``FusedOps.linear_rms_scaled`` (the consumer's half):
    ``(x @ weight.T) * rsqrt(sum(sumsq) / K + eps) + bias`` in float32, rounded to x's dtype,
    then ``silu_and_mul`` for a stacked ``[gate; up]`` weight if asked. With
    ``linear_add_rms_norm_fold`` before it, the product of the RMS-normed ``h`` (the norm
    weight applied to the activation, not to the weight)."""
    return rms_scaled(F.linear(x.float(), weight.float()), x, sumsq, eps, bias, silu_and_mul)


def rms_scaled(y: torch.Tensor, x: torch.Tensor, sumsq: torch.Tensor, eps: float, bias,
               silu_and_mul: bool) -> torch.Tensor:
    """``linear_rms_scaled``'s result from the float32 product ``y`` of ``x``."""
    y = y * torch.rsqrt(sumsq.float().sum() / x.shape[-1] + eps)
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return ReferenceOps().silu_and_mul(y) if silu_and_mul else y


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 fp8_dtype: torch.dtype) -> Fp8Activation:
    """The oracle of the optional ``FusedOps.rms_norm_fp8``: ``rms_norm`` rounded to its output
    dtype, then quantized per token (``quantization.packed.quantize_fp8_per_token``)."""
    return Fp8Activation.quantize(ReferenceOps().rms_norm(x, weight, eps), fp8_dtype)


def fused_add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float, fp8_dtype: torch.dtype):
    """The oracle of the optional ``FusedOps.fused_add_rms_norm_fp8``: ``(Fp8Activation of
    rms_norm(x + residual), x + residual)``."""
    out, res = ReferenceOps().fused_add_rms_norm(x, residual, weight, eps)
    return Fp8Activation.quantize(out, fp8_dtype), res


def silu_and_mul_fp8(x: torch.Tensor, fp8_dtype: torch.dtype) -> Fp8Activation:
    """The oracle of the optional ``FusedOps.silu_and_mul_fp8``: ``silu_and_mul`` in x's dtype,
    then quantized per token."""
    return Fp8Activation.quantize(ReferenceOps().silu_and_mul(x), fp8_dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_size: int) -> torch.Tensor:
    """Rotates the first ``2 * cos.shape[-1]`` dims of each head (all of them unless partial
    rotary); the rest pass through."""
    shape = x.shape
    x = x.view(shape[0], -1, head_size)
    rot = 2 * cos.shape[-1]
    x1, x2 = x[..., :rot].chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]), dim=-1)
    return out.reshape(shape)

