"""The llama decoder's building blocks, shared by the families built on it (``llama.py`` and
the modules that subclass ``LlamaForCausalLM``): attention (fused q/k/v projection, optional
q/k norms, rotary, paged attention, o_proj), the SwiGLU MLP (fused gate/up projection), the
pre-norm layer that joins them through fused residual-add norms, and how attention heads
split over tensor-parallel ranks.

Tokens are flat (no batch dim): ``hidden`` is ``[num_tokens, hidden_size]``. Under tensor
parallelism o_proj and down_proj leave their outputs unsummed unless told otherwise; the norm
that takes each output sums it (``DecoderLayer``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from tessellm import envs
from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.attention import Attention
from tessellm.layers.context import ModelContext
from tessellm.layers.linear import (ColumnParallelLinear, NormFold, RowParallelLinear,
                                    fold_norm_in, fold_norm_out, fp8_input_dtype,
                                    fused_linear_add_rms_norm, fused_silu_and_mul, materialize)
from tessellm.layers.norm import RMSNorm, add_and_norm
from tessellm.layers.rotary import RotaryEmbedding


class DecoderAttention(nn.Module):
    def __init__(self, config, ctx: ModelContext, rotary: RotaryEmbedding, qkv_bias: bool,
                 qk_norm: bool, o_bias: bool = False, window: Optional[int] = None,
                 scale: Optional[float] = None, reduce_output: bool = False,
                 clip_qkv: Optional[float] = None, logit_softcap: Optional[float] = None,
                 attention_sinks: bool = False, attention_chunk_size: Optional[int] = None):
        """``window``: this layer's sliding window (None: full attention). ``scale``: of the
        attention scores (None: ``head_size ** -0.5``). ``reduce_output``: o_proj sums its
        output over the tensor ranks itself (it always does with a bias). ``clip_qkv``
        (OLMo): q, k and v are clamped to ``[-clip_qkv, clip_qkv]`` after the projection.
        ``rotary`` None: no rotation (GPT-BigCode's learned positions, SmolLM3's NoPE layers).
        ``logit_softcap`` (Gemma 2): the scaled scores are soft-capped, ``cap * tanh(s / cap)``,
        by the attention kernel (``AttentionSpec.logit_softcap``); None: no cap.
        ``attention_sinks`` (gpt-oss): a learned logit per query head, ``sinks`` (this rank's
        heads, float32), joins the softmax in the kernel (``AttentionSpec.attention_sinks``).
        ``attention_chunk_size`` (Llama 4): chunked local attention, each query sees the keys
        of its own chunk of that many positions (``layers/chunked_attention.py``)."""
        super().__init__()
        hidden = config.hidden_size
        tp = ctx.tp
        total_heads = config.num_attention_heads
        total_kv = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_size = getattr(config, "head_dim", None) or hidden // total_heads
        self.num_heads, self.num_kv_heads, kv_first = shard_heads(total_heads, total_kv, tp.rank, tp.size)
        self.q_size = self.num_heads * self.head_size
        self.kv_size = self.num_kv_heads * self.head_size
        d = self.head_size
        ranges = [(tp.rank * self.q_size, self.q_size), (kv_first * d, self.kv_size),
                  (kv_first * d, self.kv_size)]
        self.qkv_proj = ColumnParallelLinear(hidden, [total_heads * d, total_kv * d, total_kv * d],
                                             bias=qkv_bias, quant_method=ctx.quant_method, tp=tp,
                                             shard_ranges=ranges)
        # Without a bias the sum over ranks is left to post_attention_layernorm (DecoderLayer).
        self.o_proj = RowParallelLinear(total_heads * d, hidden, bias=o_bias,
                                        quant_method=ctx.quant_method, tp=tp,
                                        reduce_results=o_bias or reduce_output)
        self.rotary = rotary  # shared by all layers
        self.clip_qkv = clip_qkv
        self.q_norm = RMSNorm(self.head_size, config.rms_norm_eps, ctx.ops) if qk_norm else None
        self.k_norm = RMSNorm(self.head_size, config.rms_norm_eps, ctx.ops) if qk_norm else None
        kernel_kw = {"attention_sinks": True} if attention_sinks else {}  # older callables: none
        if attention_chunk_size is not None:
            kernel_kw["attention_chunk_size"] = attention_chunk_size
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_size,
                              self.head_size ** -0.5 if scale is None else scale,
                              ctx.make_attention_kernel(window, logit_softcap=logit_softcap,
                                                        **kernel_kw))
        self.sinks = (nn.Parameter(torch.zeros(self.num_heads, dtype=torch.float32),
                                   requires_grad=False) if attention_sinks else None)
        self._heads = (tp.rank * self.num_heads, total_heads)  # first of this rank's, all
        # A kernel that fuses rotary rotates q and k as it writes the KV cache (one launch
        # fewer per layer); it does NeoX over the whole head only.
        self.fuse_rotary = (rotary is not None and self.attn.fuses_rotary
                            and rotary.is_neox_style and rotary.rotary_dim == self.head_size)

    def forward(self, positions, hidden, metadata):
        q, k, v = self.project(positions, hidden)
        return self.o_proj(self.attend(positions, q, k, v, metadata))

    def project(self, positions, hidden):
        """q, k, v of ``hidden``: the projection, clamp and q/k norms, and the rotary unless
        the kernel does it (``attend``). The first of ``forward``'s three parts, which the
        decode micro-batch overlap runs apart (``models/micro_batches.py``)."""
        return self.split_qkv(positions, self.qkv_proj(hidden))

    def split_qkv(self, positions, qkv):
        """``project`` from the projection's output ``qkv`` on."""
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.norm_qk(q, k)
        if not self.fuse_rotary and self.rotary is not None:
            q, k = self.rotary(positions, q, k)
        return q, k, v

    def attend(self, positions, q, k, v, metadata):
        """The paged attention of ``project``'s q, k, v (before o_proj)."""
        if self.fuse_rotary:
            return self.attn(q, k, v, metadata, positions, self.rotary.cos_sin_cache,
                             sinks=self.sinks)
        return self.attn(q, k, v, metadata, sinks=self.sinks)

    def load_sinks(self, tensor) -> None:
        """The checkpoint's ``sinks`` ``[total heads]``: this rank's heads' entries."""
        first, total = self._heads
        if tuple(tensor.shape) != (total,):
            raise ValueError(f"Checkpoint sinks have shape {tuple(tensor.shape)}, expected "
                             f"({total},); the config does not match the weights.")
        self.sinks.data.copy_(materialize(tensor)[first:first + self.num_heads])

    def norm_qk(self, q, k):
        """Before rotary. Qwen3: q and k RMS-normed per head; without q/k norms: as they are."""
        if self.q_norm is None:
            return q, k
        t = q.shape[0]
        q = self.q_norm(q.reshape(t, self.num_heads, self.head_size)).view(t, self.q_size)
        k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_size)).view(t, self.kv_size)
        return q, k


class DecoderMLP(nn.Module):
    def __init__(self, config, ctx: ModelContext, intermediate_size: Optional[int] = None,
                 bias: bool = False, reduce_output: bool = False):
        """``reduce_output``: down_proj sums its output over the tensor ranks itself (it always
        does with a bias)."""
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias,
                                                 quant_method=ctx.quant_method, tp=ctx.tp)
        # Without a bias, summed over ranks by the next RMSNorm: the next layer's
        # input_layernorm or the final norm; with one, here (the bias is added once, after).
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias,
                                           quant_method=ctx.quant_method, tp=ctx.tp,
                                           reduce_results=bias or reduce_output)
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported by the llama family; only silu is.")
        self.ops = ctx.ops
        # the fp8 activation fold (on unless TESSELLM_FP8_ACT_FOLD=0): SiLU-and-mul quantizes for down_proj
        self._fp8_fold = (envs.fp8_act_fold()
                          and getattr(ctx.ops, "silu_and_mul_fp8", None) is not None)
        # rows up to which gate_up and the activation may run as one product: the one-row
        # GEMV's 2, or more where the backend's tile GEMM takes them (TESSELLM_DECODE_GEMM)
        rows_for = getattr(ctx.ops, "decode_gemm_rows", None)
        self._silu_rows = (rows_for() if rows_for is not None and ctx.quant_method is None
                           else 2)

    def forward(self, x):
        """``x``: the hidden states, or them quantized for gate_up_proj (an ``Fp8Activation``
        from the norm before, ``DecoderLayer``)."""
        return self.down_proj(self.activation(x))

    def activation(self, x):
        """silu_and_mul(gate_up_proj(x)): what down_proj takes."""
        # decode (1-2 rows, or more: _silu_rows): the backend's product may run the
        # activation in its epilogue
        act = fused_silu_and_mul(self.gate_up_proj, x, max_rows=self._silu_rows)
        if act is None:
            act = self._silu_and_mul(self.gate_up_proj(x))
        return act

    def _silu_and_mul(self, y):
        fp8 = fp8_input_dtype(self.down_proj, y.shape[0]) if self._fp8_fold else None
        return self.ops.silu_and_mul(y) if fp8 is None else self.ops.silu_and_mul_fp8(y, fp8)


class DecoderLayer(nn.Module):
    """Under tensor parallelism o_proj (without a bias) and down_proj leave their outputs
    unsummed; the RMSNorm that takes each output with the residual sums it over the ranks
    (``RMSNorm(reduce=tp)``), so a backend can fuse all-reduce, residual add and norm::

        layer i:  input_layernorm(h, res)  [sums h unless i == 0: the embedding is whole]
                  -> attention -> o_proj (partial) -> post_attention_layernorm (sums)
                  -> mlp -> down_proj (partial)  -> layer i+1's input_layernorm or the final norm
    """

    def __init__(self, config, ctx: ModelContext, rotary, qkv_bias: bool, qk_norm: bool,
                 index: int, mlp: Optional[nn.Module] = None, o_bias: bool = False,
                 window: Optional[int] = None, input_summed: bool = False,
                 scale: Optional[float] = None, residual_multiplier: float = 1.0,
                 clip_qkv: Optional[float] = None,
                 norm: Optional[Callable[[Optional[TensorParallel]], nn.Module]] = None,
                 attention: Optional[nn.Module] = None):
        """``input_summed``: the previous layer's MLP output is summed over the ranks already
        (an MLP with a bias), so ``input_layernorm`` does not reduce it. ``scale``: the
        attention's (None: ``head_size ** -0.5``). ``residual_multiplier`` (Granite): the
        attention and MLP outputs are scaled by it before they join the residual stream (a
        partial sum under tensor parallelism scales alike). ``clip_qkv``: ``DecoderAttention``'s.
        ``norm(reduce)``: builds each of the two norms (None: ``RMSNorm`` with
        ``config.rms_norm_eps``); ``reduce`` is the group to sum the input over, or None.
        ``attention``: a ``DecoderAttention`` (subclass) built by the family (None: one is
        built from the arguments above)."""
        super().__init__()
        self.self_attn = attention if attention is not None else DecoderAttention(
            config, ctx, rotary, qkv_bias, qk_norm, o_bias, window, scale=scale,
            clip_qkv=clip_qkv)
        self.residual_multiplier = residual_multiplier
        self.mlp = mlp if mlp is not None else DecoderMLP(config, ctx)  # output: a partial sum
        if norm is None:
            def norm(reduce):
                return RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.ops, reduce=reduce)
        self.input_layernorm = norm(ctx.tp if index > 0 and not input_summed else None)
        o_reduced = self.self_attn.o_proj.reduce_results
        self.post_attention_layernorm = norm(None if o_reduced else ctx.tp)
        self._plain_mlp = isinstance(self.mlp, DecoderMLP)  # its gate_up_proj takes the norm
        # TESSELLM_GEMV_NORM_EPILOGUE: at one row, o_proj and post_attention_layernorm as one
        # product (``fused_linear_add_rms_norm``) where nothing sits between them
        self._o_norm_fused = (envs.gemv_norm_epilogue() and residual_multiplier == 1.0
                              and isinstance(self.self_attn, DecoderAttention)
                              and type(self.self_attn).forward is DecoderAttention.forward
                              and type(self).after_attention is DecoderLayer.after_attention
                              and type(self.post_attention_layernorm) is RMSNorm)
        # (the next norm, the layer taking its output) down_proj may run that norm in its
        # epilogue for (``link_norm_epilogues``): a tuple, so no submodule is registered
        self._next_norm: Optional[tuple] = None
        # TESSELLM_NORM_FOLD2: at one row the post-attention norm split between o_proj and
        # gate_up (``fold_norm_out`` / ``fold_norm_in``), where nothing sits between them;
        # ``link_norm_folds`` sets ``_next_fold`` for down_proj and the next layer's qkv
        self._fold2 = (norm_fold2_on(ctx) and not self._o_norm_fused
                       and residual_multiplier == 1.0 and self._plain_mlp
                       and type(self.mlp) is DecoderMLP
                       and isinstance(self.self_attn, DecoderAttention)
                       and type(self.self_attn).forward is DecoderAttention.forward
                       and type(self).after_attention is DecoderLayer.after_attention
                       and type(self.post_attention_layernorm) is RMSNorm)
        self._next_fold: Optional[tuple] = None  # (the next layer's input norm, that layer)

    def forward(self, positions, hidden, residual, metadata):
        if self._fold2:
            return self._forward_fold2(positions, hidden, residual, metadata)
        hidden, residual = self.input_norm(hidden, residual)
        if self._o_norm_fused:
            return self._forward_o_norm_fused(positions, hidden, residual, metadata)
        return self.after_attention(self.self_attn(positions, hidden, metadata), residual)

    def _forward_fold2(self, positions, hidden, residual, metadata):
        """``forward`` with the norms split between the GEMVs around them where the backend
        offers it at this row count (``TESSELLM_NORM_FOLD2``). ``hidden`` may be a
        ``NormFold`` from the layer before (its down_proj ran this layer's input norm's first
        half, ``link_norm_folds``); this layer may return one for the next."""
        attn = self.self_attn
        if isinstance(hidden, NormFold):
            q, k, v = attn.split_qkv(positions, fold_norm_in(attn.qkv_proj, hidden))
        else:
            hidden, residual = self.input_norm(hidden, residual)
            q, k, v = attn.project(positions, hidden)
        a = attn.attend(positions, q, k, v, metadata)
        gate_up = self.mlp.gate_up_proj
        folded = fold_norm_out(attn.o_proj, a, residual, self.post_attention_layernorm, gate_up)
        if folded is None:
            return self.after_attention(attn.o_proj(a), residual)
        fold, residual = folded
        act = fold_norm_in(gate_up, fold, silu_and_mul=True)
        if self._next_fold is not None:  # the next layer's qkv_proj looked up now (LoRA wraps)
            norm, layer = self._next_fold
            nxt = fold_norm_out(self.mlp.down_proj, act, residual, norm,
                                layer.self_attn.qkv_proj)
            if nxt is not None:
                return nxt
        return self.mlp.down_proj(act), residual

    def _forward_o_norm_fused(self, positions, hidden, residual, metadata):
        """``forward`` after the input norm, with o_proj and the post-attention norm as one
        product where the backend offers it at this row count (else as ``after_attention``)."""
        attn = self.self_attn
        q, k, v = attn.project(positions, hidden)
        a = attn.attend(positions, q, k, v, metadata)
        gate_up = self.mlp.gate_up_proj if self._plain_mlp else None
        fused = fused_linear_add_rms_norm(attn.o_proj, a, residual, self.post_attention_layernorm,
                                          consumer=gate_up)
        if fused is None:
            return self.after_attention(attn.o_proj(a), residual)
        hidden, residual = fused
        if self._next_norm is None:
            return self.mlp(hidden), residual
        # down_proj and the next layer's input norm (or the final norm) as one product too:
        # the norm is handed to its module, whose next call returns it (link_norm_epilogues)
        nxt, consumer = self._next_norm
        act = self.mlp.activation(hidden)
        fused = fused_linear_add_rms_norm(self.mlp.down_proj, act, residual, nxt,
                                          consumer=consumer)
        if fused is None:
            return self.mlp.down_proj(act), residual
        nxt.hand_off(*fused)
        return fused

    def input_norm(self, hidden, residual):
        """``input_layernorm`` (the residual stream starts at the first layer's input)."""
        # Each norm is told which layer takes its output (looked up per call: LoRA wraps
        # layers after construction), so it can quantize for it (the fp8 fold, RMSNorm).
        return add_and_norm(self.input_layernorm, hidden, residual,
                            consumer=self.self_attn.qkv_proj)

    def after_attention(self, hidden, residual):
        """From the attention's output (after o_proj) to the layer's ``(hidden, residual)``:
        the post-attention norm and the MLP."""
        if self.residual_multiplier != 1.0:
            hidden = hidden * self.residual_multiplier
        gate_up = self.mlp.gate_up_proj if self._plain_mlp else None
        hidden, residual = self.post_attention_layernorm(hidden, residual, consumer=gate_up)
        out = self.mlp(hidden)
        if self.residual_multiplier != 1.0:
            out = out * self.residual_multiplier
        return out, residual


def link_norm_epilogues(layers, start: int, end: int, final_norm: Optional[nn.Module]) -> int:
    """``TESSELLM_GEMV_NORM_EPILOGUE``'s second half: each ``DecoderLayer`` in
    ``layers[start:end]`` running its fused o_proj path with a plain ``DecoderMLP`` gets the
    norm its output goes to next (the next layer's ``input_layernorm``, or ``final_norm`` after
    the last: None where the stage does not end in it), so at one row its down_proj runs that
    residual-add RMSNorm in its GEMV's last program and hands the result to the norm module
    (``RMSNorm.hand_off``). Only where that norm is exactly the next thing to take ``(hidden,
    residual)``: layers that run ``DecoderLayer.forward`` itself, a next layer that runs
    ``DecoderLayer.input_norm`` too, and an ``RMSNorm`` without a reduce group. The caller passes
    ``final_norm`` only where its forward calls ``final_norm(hidden, residual)`` on the last
    layer's output. Returns how many layers were linked."""
    linked = 0
    for i in range(start, end):
        layer = layers[i]
        if (not getattr(layer, "_o_norm_fused", False) or type(layer.mlp) is not DecoderMLP
                or type(layer).forward is not DecoderLayer.forward):
            continue  # (a forward of its own may change the output the norm was formed from)
        norm, consumer = final_norm, None
        if i + 1 < end:
            nxt = layers[i + 1]
            if not (isinstance(nxt, DecoderLayer) and type(nxt).forward is DecoderLayer.forward
                    and type(nxt).input_norm is DecoderLayer.input_norm):
                continue
            norm, consumer = nxt.input_layernorm, nxt.self_attn.qkv_proj
        if type(norm) is not RMSNorm or norm.reduce is not None:
            continue
        layer._next_norm = (norm, consumer)
        linked += 1
    return linked


def norm_fold2_on(ctx) -> bool:
    """Whether the decoder layers take ``TESSELLM_NORM_FOLD2``'s path: as the variable says
    where it is set, else the backend's choice (its ``FusedOps.norm_fold_default``, an
    optional attribute: the cuda backend's is True) for dense bfloat16 / float16 weights only
    (quantized products and float32 keep the two norm launches; ``envs.norm_fold2``)."""
    wanted = envs.norm_fold2()
    if wanted is not None:
        return wanted
    return (bool(getattr(ctx.ops, "norm_fold_default", False)) and ctx.quant_method is None
            and ctx.dtype in (torch.bfloat16, torch.float16))


def link_norm_folds(layers, start: int, end: int) -> int:
    """``TESSELLM_NORM_FOLD2``'s second half: each ``DecoderLayer`` in ``layers[start:end]``
    on its fold path whose next layer is on it too (``forward`` and ``input_norm`` its own)
    gets that layer's input norm and the layer, so at one row its down_proj runs the norm's
    first half and hands the next layer a ``NormFold`` instead of ``(hidden, residual)``. Not
    the last layer: the final norm stays a launch (the LM head reads whole normed rows). Only
    into an ``RMSNorm`` without a reduce group. Returns how many layers were linked."""
    linked = 0
    for i in range(start, end - 1):
        layer, nxt = layers[i], layers[i + 1]
        if not (getattr(layer, "_fold2", False) and getattr(nxt, "_fold2", False)
                and type(layer).forward is DecoderLayer.forward
                and type(nxt).forward is DecoderLayer.forward
                and type(nxt).input_norm is DecoderLayer.input_norm
                and type(nxt.self_attn).project is DecoderAttention.project):
            continue
        norm = nxt.input_layernorm
        if type(norm) is not RMSNorm or norm.reduce is not None:
            continue
        layer._next_fold = (norm, nxt)
        linked += 1
    return linked


def shard_heads(num_heads: int, num_kv_heads: int, rank: int, size: int) -> tuple[int, int, int]:
    """(query heads, KV heads, first KV head) on tensor rank ``rank`` of ``size``.

    Query heads split evenly. KV heads split too when there are at least ``size`` of them;
    with fewer, each is replicated on ``size // num_kv_heads`` consecutive ranks, which are
    exactly the ranks whose query heads use it (GQA groups stay whole).
    """
    if num_heads % size:
        raise ValueError(f"The model's {num_heads} attention heads do not split over "
                         f"tensor_parallel_size {size}; use a size that divides {num_heads}.")
    if num_kv_heads >= size:
        if num_kv_heads % size:
            raise ValueError(f"The model's {num_kv_heads} KV heads do not split over "
                             f"tensor_parallel_size {size}; use a size that divides {num_kv_heads}.")
        per_rank = num_kv_heads // size
        return num_heads // size, per_rank, rank * per_rank
    if size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {size} is not a multiple of the model's "
                         f"{num_kv_heads} KV heads, so they cannot be replicated evenly; use a "
                         f"size that is a divisor or a multiple of {num_kv_heads}.")
    return num_heads // size, 1, rank // (size // num_kv_heads)
