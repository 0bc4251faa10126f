"""EAGLE and EAGLE-3 draft heads: one decoder layer over the target model's hidden states.

A head drafts at the feature level. At position ``p`` it reads the embedding of the *next*
token ``t[p+1]`` and a hidden state ``h[p]`` of the target, and predicts ``t[p+2]``::

    EAGLE-1  x = fc([embed(t[p+1]), h_final[p]])        fc: [H, 2H] (bias optional)
             layer 0 (no input_layernorm) -> out = hidden + residual
             logits = target.lm_head(out)               next step's hidden: out
    EAGLE-3  g = fc([h_low[p], h_mid[p], h_high[p]])    fc: [H, 3H_target], first step only
             x = [input_layernorm(embed(t[p+1])), hidden_norm(g)]   2H wide into q/k/v
             residual g; post_attention_layernorm; mlp; norm -> logits over the draft vocab
             (own lm_head [V_draft, H]); target id = draft id + d2t[draft id]
             next step's hidden: the pre-norm output (H wide, no fc)

Checkpoints follow the public layouts (yuhuili/EAGLE-LLaMA3-Instruct-8B: ``fc.*``,
``layers.0.*``; yuhuili/EAGLE3-LLaMA3.1-Instruct-8B: ``fc.weight``, ``midlayer.*``, ``norm``,
``lm_head``, ``d2t``, ``t2d``), as ``model.safetensors`` (or shards) or ``pytorch_model.bin``.
The embedding (and EAGLE-1's LM head) are the target's unless the checkpoint carries its own.

Under tensor parallelism (``ctx.tp``) the head shards like the target: q/k/v and gate/up
column-parallel, o/down row-parallel (summed by the norm that takes them, or before the output),
an own embedding and EAGLE-3's LM head vocab-parallel (logits gathered, so every rank drafts the
same argmax). ``fc`` is replicated: it reads hidden states every rank holds whole (the target's,
after its all-reduce). The shared embedding and LM head are the target's shards.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from tessellm.layers.attention import Attention
from tessellm.layers.context import ModelContext
from tessellm.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear
from tessellm.layers.norm import RMSNorm
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from tessellm.models.decoder import DecoderLayer, DecoderMLP, shard_heads
from tessellm.models.llama import LlamaForCausalLM


class EagleHead(nn.Module):
    """EAGLE-1: ``fc`` over [embedding, target final hidden], one Llama decoder layer."""

    method = "eagle"
    stacked_params = LlamaForCausalLM.stacked_params

    def __init__(self, config, ctx: ModelContext, target, fc_bias: bool = False):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.fc = Linear(2 * hidden, [hidden], bias=fc_bias)
        rotary = _rotary(config, ctx)
        n = config.num_hidden_layers
        # The last layer's down_proj sums its output over the ranks itself: nothing after it
        # reduces (the output is ``x + residual``, not a norm).
        self.layers = nn.ModuleList(
            DecoderLayer(config, ctx, rotary, False, False, i,
                         mlp=DecoderMLP(config, ctx, reduce_output=True) if i == n - 1 else None)
            for i in range(n))
        self.layers[0].input_layernorm = None  # EAGLE-1 skips it on the first layer
        # Shared, not loaded (unless the head has one). The raw table: a target's own scaling
        # (Granite's embedding_multiplier) is not applied, as heads are trained (vLLM's
        # speculators look the token up in the verifier's embedding weights).
        self.embed_tokens = target.embed_tokens
        self.lm_head = target.lm_head

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def combine(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """The target's hidden states as the first draft step reads them (EAGLE-1: as is)."""
        return target_hidden

    def forward(self, input_ids, positions, metadata, hidden):
        """Returns ``(states for logits, hidden for the next draft step)``: both the pre-norm
        output of the layer stack."""
        x = self.fc(torch.cat([self.embed_tokens(input_ids), hidden], dim=-1))
        residual = None
        for i, layer in enumerate(self.layers):
            if i == 0:
                residual = x
                x = layer.self_attn(positions, x, metadata)
                x, residual = layer.post_attention_layernorm(x, residual)
                x = layer.mlp(x)
            else:
                x, residual = layer(positions, x, residual, metadata)
        out = x + residual
        return out, out

    def draft_tokens(self, states: torch.Tensor) -> torch.Tensor:
        """Greedy draft ids in the target's vocabulary."""
        return self.lm_head(states).argmax(dim=-1)

    def weight_name(self, name: str) -> Optional[str]:
        """Checkpoint name -> ours (None: skip)."""
        name = name[len("model."):] if name.startswith("model.") else name
        if name in ("layers.0.input_layernorm.weight", "embed_tokens.weight", "lm_head.weight"):
            return None  # unused by EAGLE-1, or the target's (shared)
        return None if "rotary_emb" in name else name


class Eagle3Attention(nn.Module):
    """Llama attention whose q/k/v read ``2 * hidden`` features ([embeds, hidden])."""

    def __init__(self, config, ctx: ModelContext, rotary: RotaryEmbedding):
        super().__init__()
        hidden, heads, tp = config.hidden_size, config.num_attention_heads, ctx.tp
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_size = getattr(config, "head_dim", None) or hidden // heads
        d = self.head_size
        self.num_heads, self.num_kv_heads, kv_first = shard_heads(heads, kv_heads, tp.rank, tp.size)
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        ranges = [(tp.rank * self.q_size, self.q_size), (kv_first * d, self.kv_size),
                  (kv_first * d, self.kv_size)]
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = ColumnParallelLinear(2 * hidden, [heads * d, kv_heads * d, kv_heads * d],
                                             bias=bias, tp=tp, shard_ranges=ranges)
        self.o_proj = RowParallelLinear(heads * d, hidden, bias=bias, tp=tp)  # summed here
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, d ** -0.5,
                              ctx.make_attention_kernel(None))

    def forward(self, positions, x, metadata):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, metadata))


class Eagle3Head(nn.Module):
    """EAGLE-3: ``fc`` over three target layers' hidden states, a 2H-input decoder layer
    (``midlayer``), a final norm and an LM head over a reduced draft vocabulary."""

    method = "eagle3"
    stacked_params = LlamaForCausalLM.stacked_params

    def __init__(self, config, ctx: ModelContext, target, own_embedding: bool = False):
        super().__init__()
        self.config = config
        hidden, eps = config.hidden_size, config.rms_norm_eps
        target_hidden = getattr(config, "target_hidden_size", None) or hidden
        self.fc = Linear(3 * target_hidden, [hidden], bias=False)
        self.self_attn = Eagle3Attention(config, ctx, _rotary(config, ctx))
        self.mlp = DecoderMLP(config, ctx)
        self.input_layernorm = RMSNorm(hidden, eps, ctx.ops)
        self.hidden_norm = RMSNorm(hidden, eps, ctx.ops)
        self.post_attention_layernorm = RMSNorm(hidden, eps, ctx.ops)
        self.norm = RMSNorm(hidden, eps, ctx.ops, reduce=ctx.tp)  # sums down_proj's partial output
        draft_vocab = getattr(config, "draft_vocab_size", None) or config.vocab_size
        self.lm_head = ParallelLMHead(draft_vocab, hidden, ctx.tp)
        self.d2t = nn.Parameter(torch.zeros(draft_vocab, dtype=torch.long), requires_grad=False)
        self.owns_embedding = own_embedding
        if own_embedding:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, ctx.tp)
        else:
            self.embed_tokens = target.embed_tokens

    def attention_layers(self) -> list[Attention]:
        return [self.self_attn.attn]

    def combine(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """[T, 3 * H_target] (low, mid, high layers side by side) -> [T, H]."""
        return self.fc(aux_hidden)

    def forward(self, input_ids, positions, metadata, hidden):
        """``hidden``: [T, H] (``combine``'s output, or the previous draft step's). Returns
        ``(normed states for logits, pre-norm hidden for the next draft step)``."""
        embeds = self.input_layernorm(self.embed_tokens(input_ids))
        residual = hidden
        x = torch.cat([embeds, self.hidden_norm(hidden)], dim=-1)
        x = self.self_attn(positions, x, metadata)
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x)
        normed, prenorm = self.norm(x, residual)
        return normed, prenorm

    def draft_tokens(self, states: torch.Tensor) -> torch.Tensor:
        draft = self.lm_head(states).argmax(dim=-1)
        return draft + self.d2t[draft]

    def weight_name(self, name: str) -> Optional[str]:
        name = name[len("model."):] if name.startswith("model.") else name
        if name == "t2d" or "rotary_emb" in name:
            return None  # t2d: the target-to-draft mask; drafting needs only d2t
        return name.replace("midlayer.", "")


def _rotary(config, ctx: ModelContext) -> RotaryEmbedding:
    heads = config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    return RotaryEmbedding.from_config(config, head_size, ctx.ops,
                                       max_positions=ctx.max_positions)


# -- loading ---------------------------------------------------------------------------------

def load_eagle_head(path: str, method: str, target, ctx: ModelContext, load_format: str = "auto",
                    seed: int = 0) -> nn.Module:
    """Build the ``method`` ("eagle" or "eagle3") head stored at ``path`` over ``target`` (a
    llama-family model: its embedding and, for EAGLE-1, its LM head are shared) and fill its
    weights. ``load_format="dummy"``: random weights from the config alone (benchmarks)."""
    config = head_config(path, method)
    tensors = {} if load_format == "dummy" else _read_checkpoint(path)
    _check_against_target(config, method, target, tensors, path)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(ctx.dtype)
    try:
        with torch.device(ctx.device):
            if method == "eagle":
                head = EagleHead(config, ctx, target, fc_bias="fc.bias" in tensors)
            else:
                head = Eagle3Head(config, ctx, target, own_embedding="embed_tokens.weight" in tensors)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        _dummy(head, seed)
    else:
        _load(head, tensors, path)
    return head.eval()


def head_config(path: str, method: str = "eagle"):
    """The head's HF config (a LlamaConfig: EAGLE heads publish ``model_type: llama``)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"The {method} head directory {path} has no config.json; give the "
                         "directory of a head checkpoint (config.json and its weights).")
    from transformers import LlamaConfig

    return LlamaConfig.from_pretrained(path)


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    from tessellm.loader.safetensors_loader import iter_safetensors_weights

    names = os.listdir(path)
    if any(n.endswith(".safetensors") for n in names):
        return {n: t for n, t in iter_safetensors_weights(path, torch.float32)}
    bins = sorted(n for n in names if n.startswith("pytorch_model") and n.endswith(".bin"))
    if not bins:
        raise ValueError(f"The EAGLE head directory {path} holds no weights (neither "
                         "*.safetensors nor pytorch_model*.bin); give a complete head checkpoint.")
    tensors = {}
    for n in bins:
        tensors.update(torch.load(os.path.join(path, n), map_location="cpu", weights_only=True))
    return tensors


def _check_against_target(config, method: str, target, tensors: dict, path: str) -> None:
    """One sentence for each way a head can not fit its target."""
    t_cfg = target.config
    if config.vocab_size != t_cfg.vocab_size:
        raise ValueError(f"The {method} head at {path} has vocab_size {config.vocab_size} but the "
                         f"target model has {t_cfg.vocab_size}; use a head trained for this target.")
    eagle3 = method == "eagle3"
    target_hidden = (getattr(config, "target_hidden_size", None) or config.hidden_size
                     if eagle3 else config.hidden_size)
    width = (3 if eagle3 else 2) * target_hidden  # EAGLE-1: [embedding (H), target hidden (H)]
    fc = tensors.get("fc.weight")
    if fc is not None and tuple(fc.shape) != (config.hidden_size, width):
        hint = (" (an EAGLE-1 head? use method 'eagle')" if method == "eagle3" and fc.shape[1] == 2 * config.hidden_size
                else " (an EAGLE-3 head? use method 'eagle3')" if method == "eagle" and fc.shape[1] == 3 * config.hidden_size
                else "")
        raise ValueError(f"The {method} head at {path} has fc.weight of shape {tuple(fc.shape)}, "
                         f"expected {(config.hidden_size, width)}{hint}.")
    if target_hidden != t_cfg.hidden_size:
        raise ValueError(f"The {method} head at {path} reads target hidden states of width "
                         f"{target_hidden} but the target model's hidden_size is "
                         f"{t_cfg.hidden_size}; use a head trained for this target.")
    if config.hidden_size != t_cfg.hidden_size and "embed_tokens.weight" not in tensors:
        raise ValueError(f"The {method} head at {path} has hidden_size {config.hidden_size} and "
                         f"no embedding of its own, but the target's embedding is "
                         f"{t_cfg.hidden_size} wide; use a head trained for this target.")


def _load(head: nn.Module, tensors: dict, path: str) -> None:
    params = dict(head.named_parameters())
    shared = {n for n, p in params.items() if _is_shared(head, n)}
    modules = dict(head.named_modules())
    loaded: set[str] = set()
    for ckpt_name, tensor in tensors.items():
        name = head.weight_name(ckpt_name)
        if name is None:
            continue
        for ckpt_part, our_part, shard in head.stacked_params:
            if ckpt_part in name:
                fused = name.replace(ckpt_part, our_part)
                module_name, _, attr = fused.rpartition(".")
                _checked(lambda: modules[module_name].load_shard(attr, tensor, shard), path)
                loaded.add(fused)
                break
        else:
            if name not in params or name in shared:
                raise ValueError(f"Checkpoint tensor {ckpt_name!r} at {path} has no place in "
                                 f"the {head.method} head; is this the right method?")
            module_name, _, attr = name.rpartition(".")
            module = modules[module_name]
            if isinstance(module, (VocabParallelEmbedding, ParallelLMHead)):
                _checked(lambda: module.load_weight(tensor), path)  # this rank's rows
            elif isinstance(module, Linear):
                _checked(lambda: module.load_shard(attr, tensor, None), path)  # rows or columns
            elif tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"Checkpoint tensor {ckpt_name!r} at {path} has shape "
                                 f"{tuple(tensor.shape)}, expected {tuple(params[name].shape)}; "
                                 "the head's config.json does not match its weights.")
            else:
                params[name].data.copy_(tensor)
            loaded.add(name)
    missing = sorted(set(params) - shared - loaded - _optional(head))
    if missing:
        raise ValueError(f"The {head.method} head at {path} lacks {len(missing)} weights, e.g. "
                         f"{missing[:3]}; is the checkpoint complete and of method {head.method!r}?")


def _optional(head: nn.Module) -> set[str]:
    """An EAGLE-3 head over the whole target vocabulary may leave out ``d2t`` (all zeros)."""
    d2t = getattr(head, "d2t", None)
    return {"d2t"} if d2t is not None and d2t.numel() == head.config.vocab_size else set()


def _checked(load, path: str) -> None:
    try:
        load()
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"The EAGLE head at {path} does not fit its config: {e}") from None


def _is_shared(head: nn.Module, name: str) -> bool:
    """Parameters that belong to the target (its embedding, EAGLE-1's LM head)."""
    return (name.startswith("embed_tokens.") and not getattr(head, "owns_embedding", False)) or (
        name.startswith("lm_head.") and isinstance(head, EagleHead))


@torch.no_grad()
def _dummy(head: nn.Module, seed: int) -> None:
    gen = torch.Generator(device=next(head.parameters()).device).manual_seed(seed)
    for name, param in head.named_parameters():
        if _is_shared(head, name):
            continue
        if name == "d2t":
            continue  # zeros: draft id = target id (the first V_draft tokens)
        if "norm" in name:
            param.data.uniform_(0.9, 1.1, generator=gen)
        elif param.is_floating_point():
            param.data.uniform_(-0.02, 0.02, generator=gen)
