"""Multi-head latent attention (MLA) of DeepSeek-V2/V3, in the absorbed form, over a paged cache
of latent rows (``layers/mla_attention.py``, ``AttentionSpec.mla_value_size``).

Projections (HF names; ``H`` heads, ``n`` = qk_nope_head_dim, ``r`` = qk_rope_head_dim, ``v`` =
v_head_dim, ``c`` = kv_lora_rank)::

    q      = q_proj(x)  or  q_b_proj(q_a_layernorm(q_a_proj(x)))        [T, H, n + r]
    latent = kv_a_proj_with_mqa(x) = [c_kv_raw (c) | k_pe (r)]           one row per token
    c_kv   = kv_a_layernorm(c_kv_raw)
    kv_b_proj.weight = per head [W_UK (n x c) ; W_UV (v x c)]           keys/values from c_kv

HF expands c_kv into per-head keys ``[W_UK c_kv | k_pe]`` and values ``W_UV c_kv``. Since
``q_nope . (W_UK c_kv) = (q_nope W_UK) . c_kv``, the same scores come from one cached row per
token and an absorbed query, and ``softmax @ (W_UV c_kv) = W_UV (softmax @ c_kv)``::

    cache row = [c_kv | rope(k_pe)]                 (c + r values; 576 for the released models)
    q row     = [q_nope @ W_UK | rope(q_pe)]        per head
    out_h     = W_UV (softmax(scale * q_row . rows) @ c_kv)   -> o_proj

This is multi-query attention with one KV head whose values are the first ``c`` dims of the key
(the kernel's ``supports_mla``); prefill and decode both run it, so chunked prefill and prefix
caching read the same rows. Where the kernel offers it (``layers/mla_attention.py``), long
prefill chunks take HF's expanded form instead, over the same cached rows: ``kv_b_proj`` of
each chunk's whole context, then multi-head attention with 192-wide keys and 128-wide values
(``kernels/attention/mla_prefill.py`` says why: 2.4x less work at 2k queries). ``scale`` is
``(n + r) ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under YaRN with
``mscale_all_dim`` (HF's ``yarn_apply_mscale``).

Rotary: DeepSeek's checkpoints rotate interleaved pairs ``(x[2i], x[2i+1])`` of the rope dims
(V2 always; V3 unless ``rope_interleave`` is false); they are reordered evens-then-odds on the
projected q and k (``interleaved_rotary.py``) and rotated NeoX style, the same scores.

Tensor parallelism: heads split over the ranks (q_proj / q_b_proj, kv_b_proj column-parallel,
o_proj row-parallel); q_a_proj and kv_a_proj_with_mqa are replicated, so every rank caches the
whole latent row of every token (as vLLM does).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear
from tessellm.layers.mla_attention import LatentAttention
from tessellm.layers.norm import RMSNorm
from tessellm.layers.rope_config import rope_parameters
from tessellm.layers.rotary import RotaryEmbedding, yarn_mscale
from tessellm.models.interleaved_rotary import evens_then_odds

# HF's DeepseekV2RMSNorm default: q_a_layernorm and kv_a_layernorm do not take rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(config) -> float:
    """``(n + r) ** -0.5``, times ``mscale ** 2`` when a scaled rope sets ``mscale_all_dim``."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    all_dim = params.get("mscale_all_dim")
    if params["rope_type"] != "default" and all_dim:
        mscale = yarn_mscale(float(params["factor"]), all_dim)
        scale *= mscale * mscale
    return scale


class MLAttention(nn.Module):
    def __init__(self, config, ctx: ModelContext, rotary: RotaryEmbedding, interleaved: bool):
        super().__init__()
        tp = ctx.tp
        heads = config.num_attention_heads
        if heads % tp.size:
            raise ValueError(f"The model's {heads} attention heads do not split over "
                             f"tensor_parallel_size {tp.size}; use a size that divides {heads}.")
        self.num_heads = heads // tp.size
        self.nope, self.rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.latent = config.v_head_dim, config.kv_lora_rank
        hidden, bias = config.hidden_size, bool(getattr(config, "attention_bias", False))
        qk = self.nope + self.rope
        self.q_lora_rank = getattr(config, "q_lora_rank", None)
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, [heads * qk], tp=tp)
        else:
            self.q_a_proj = Linear(hidden, [self.q_lora_rank], bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS, ctx.ops)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, [heads * qk], tp=tp)
        self.kv_a_proj_with_mqa = Linear(hidden, [self.latent + self.rope], bias=bias)
        self.kv_a_layernorm = RMSNorm(self.latent, LATENT_NORM_EPS, ctx.ops)
        self.kv_b_proj = ColumnParallelLinear(self.latent, [heads * (self.nope + self.v_dim)],
                                              tp=tp)
        # Without a bias the sum over ranks is left to post_attention_layernorm (DecoderLayer).
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, bias=bias, tp=tp,
                                        reduce_results=bias)
        self.qkv_proj = None  # DecoderLayer's fp8-fold consumer: none (MLA runs unquantized)
        self.rotary = rotary
        self.interleaved = interleaved
        row = self.latent + self.rope
        kernel = ctx.make_attention_kernel(None, num_kv_heads=1, head_size=row,
                                           mla_value_size=self.latent)
        self.attn = LatentAttention(self.num_heads, row, self.latent, mla_softmax_scale(config),
                                    kernel)

    def forward(self, positions, hidden, metadata):
        t, h = hidden.shape[0], self.num_heads
        if self.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(t, h, self.nope + self.rope)
        latent = self.kv_a_proj_with_mqa(hidden)
        c_kv = self.kv_a_layernorm(latent[:, :self.latent].contiguous())
        q_pe, k_pe = self._rotate(positions, q[..., self.nope:], latent[:, self.latent:])
        q_pe = q_pe.view(t, h, self.rope)
        w_uk, w_uv = self.kv_b_proj.weight.view(h, self.nope + self.v_dim, self.latent).split(
            [self.nope, self.v_dim], dim=1)
        expanded = self.attn.expanded_rows(metadata)  # None: every query absorbed
        n = t if expanded is None else expanded
        q_latent = torch.bmm(q[:n, :, :self.nope].transpose(0, 1), w_uk)  # [H, n, c]
        q_row = torch.cat((q_latent.transpose(0, 1), q_pe[:n]), dim=-1)
        out = self.attn(q_row, torch.cat((c_kv, k_pe), dim=-1), metadata)  # [n, H, c]
        out = torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [n, H, v]
        if expanded is not None:
            out = torch.cat((out, self._expanded(q[n:], q_pe[n:], metadata)))
        return self.o_proj(out.reshape(t, h * self.v_dim))

    def _expanded(self, q, q_pe, metadata):
        """The step's long prefill chunks in the expanded form (``kernels/attention/
        mla_prefill.py``): their contexts' cached rows decompressed by ``kv_b_proj`` into
        per-head keys ``[W_UK c_kv | k_pe]`` and values ``W_UV c_kv``, as HF computes them;
        ``[T_p, H, v]``."""
        h = self.num_heads
        rows = self.attn.context_rows(metadata, q.dtype)  # [K, c + r]
        kv = self.kv_b_proj(rows[:, :self.latent]).view(-1, h, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat((q[..., :self.nope], q_pe), dim=-1)
        return self.attn.forward_expanded(q, k_nope, rows[:, self.latent:], v, metadata)

    def _rotate(self, positions, q_pe, k_pe):
        """q_pe ``[T, H, r]``, k_pe ``[T, r]`` rotated: ``([T, H * r], [T, r])``."""
        t, r = q_pe.shape[0], self.rope
        q_pe, k_pe = q_pe.reshape(t, -1), k_pe.contiguous()
        if self.interleaved:
            q_pe, k_pe = evens_then_odds(q_pe, r, r), evens_then_odds(k_pe, r, r)
        return self.rotary(positions, q_pe.contiguous(), k_pe.contiguous())
