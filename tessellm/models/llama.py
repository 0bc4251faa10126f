"""The llama family: Llama 2/3/3.1/3.2, SmolLM2, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

One decoder definition; the differences are config switches. Tokens are flat (no batch dim):
``input_ids`` and ``positions`` are ``[num_tokens]``.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.layers.attention import Attention
from tessellm.layers.context import ModelContext
from tessellm.layers.linear import Linear
from tessellm.layers.norm import RMSNorm
from tessellm.layers.rotary import RotaryEmbedding


class DecoderAttention(nn.Module):
    def __init__(self, config, ctx: ModelContext, rotary: RotaryEmbedding, qkv_bias: bool,
                 qk_norm: bool):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_size = getattr(config, "head_dim", None) or hidden // self.num_heads
        self.q_size = self.num_heads * self.head_size
        self.kv_size = self.num_kv_heads * self.head_size
        self.qkv_proj = Linear(hidden, [self.q_size, self.kv_size, self.kv_size], bias=qkv_bias,
                               quant_method=ctx.quant_method)
        self.o_proj = Linear(self.q_size, [hidden], bias=getattr(config, "attention_bias", False)
                             and not qkv_bias, quant_method=ctx.quant_method)
        self.rotary = rotary  # shared by all layers
        eps = config.rms_norm_eps
        self.q_norm = RMSNorm(self.head_size, eps, ctx.ops) if qk_norm else None
        self.k_norm = RMSNorm(self.head_size, eps, ctx.ops) if qk_norm else None
        window = getattr(config, "sliding_window", None) if _uses_sliding_window(config) else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_size,
                              self.head_size ** -0.5, ctx.make_attention_kernel(window))

    def forward(self, positions, hidden, metadata):
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            t = q.shape[0]
            q = self.q_norm(q.reshape(t, self.num_heads, self.head_size)).view(t, self.q_size)
            k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_size)).view(t, self.kv_size)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, metadata))


class DecoderMLP(nn.Module):
    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, [inter, inter], quant_method=ctx.quant_method)
        self.down_proj = Linear(inter, [config.hidden_size], quant_method=ctx.quant_method)
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported by the llama family; only silu is.")
        self.ops = ctx.ops

    def forward(self, x):
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config, ctx: ModelContext, rotary, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.self_attn = DecoderAttention(config, ctx, rotary, qkv_bias, qk_norm)
        self.mlp = DecoderMLP(config, ctx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.ops)

    def forward(self, positions, hidden, residual, metadata):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False

    # checkpoint name fragment -> (our fused param fragment, shard index)
    stacked_params = (
        (".q_proj.", ".qkv_proj.", 0), (".k_proj.", ".qkv_proj.", 1), (".v_proj.", ".qkv_proj.", 2),
        (".gate_proj.", ".gate_up_proj.", 0), (".up_proj.", ".gate_up_proj.", 1),
    )

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        heads = config.num_attention_heads
        head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
        rotary = RotaryEmbedding(head_size, config.max_position_embeddings, _rope_theta(config),
                                 _rope_scaling(config), ctx.ops)
        self.layers = nn.ModuleList(DecoderLayer(config, ctx, rotary, self.qkv_bias, self.qk_norm)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.ops)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size),
                                        requires_grad=False)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.tie_word_embeddings else self.lm_head
        return F.linear(hidden, weight)

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors. Returns the names of the parameters that were filled."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = _strip_prefix(name)
            if name is None:
                continue
            if name == "lm_head.weight":
                if self.tie_word_embeddings:
                    continue
                name = "lm_head"
            for ckpt_part, our_part, shard in self.stacked_params:
                if ckpt_part in name:
                    fused = name.replace(ckpt_part, our_part)
                    module_name, _, attr = fused.rpartition(".")
                    modules[module_name].load_shard(attr, tensor, shard)
                    loaded.add(fused)
                    break
            else:
                if name.endswith((".o_proj.weight", ".down_proj.weight", ".o_proj.bias")):
                    module_name, _, attr = name.rpartition(".")
                    modules[module_name].load_shard(attr, tensor, None)
                elif name in params:
                    _copy(params[name], tensor, name)
                else:
                    raise ValueError(f"Checkpoint tensor {name!r} has no place in "
                                     f"{type(self).__name__}; is this the right architecture?")
                loaded.add(name)
        return loaded


def _strip_prefix(name: str) -> Optional[str]:
    """HF names: 'model.layers.0...' -> 'layers.0...'; drop buffers we compute ourselves."""
    if "rotary_emb.inv_freq" in name:
        return None
    if name.startswith("model."):
        return name[len("model."):]
    return name


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"Checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected "
                         f"{tuple(param.shape)}; the config does not match the weights.")
    param.data.copy_(tensor)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rope_scaling(config) -> Optional[dict]:
    scaling = getattr(config, "rope_scaling", None)
    if scaling:
        return dict(scaling)
    params = getattr(config, "rope_parameters", None)
    if params and params.get("rope_type", "default") != "default":
        return dict(params)
    return None


def _uses_sliding_window(config) -> bool:
    if getattr(config, "sliding_window", None) is None:
        return False
    return getattr(config, "use_sliding_window", True) is not False


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
