"""Multi-token-prediction (MTP) layers of a target's own checkpoint, as a draft head.

DeepSeek-V3 / R1, GLM-4.5 / 4.6, ERNIE 4.5 MoE (``ERNIE``: its own names, no shared head:
the target's final norm and LM head) and Qwen3-Next (``QWEN3_NEXT``: ``mtp.*`` names, (1 + w)
norms, a gated full-attention layer with the model's MoE, the target's embedding and head) ship, past their ``num_hidden_layers`` decoder layers,
``num_nextn_predict_layers`` MTP modules trained to predict one token further. Module ``k``
at position ``p`` reads the previous depth's hidden state ``h[p]`` (depth 0: the target's
final, normed hidden state) and the embedding of the token at ``p + 1``::

    x    = eh_proj([enorm(embed(t[p+1])) ; hnorm(h[p])])         eh_proj: [H, 2H], no bias
    x, r = decoder layer (the family's own: MLA + MoE for DeepSeek-V3, GQA + MoE for GLM)
    out  = x + r                                  (hidden state for the next depth)
    logits = head(shared_head.norm(out))          head: shared_head.head, else the target's

(the V3 report writes the concatenation hidden-first; the released weights, and vLLM and
SGLang, put the embedding first). Checkpoint names: ``model.layers.<N>.{enorm, hnorm,
eh_proj, shared_head.norm, shared_head.head, embed_tokens}`` beside the decoder layer's own
tensors under ``model.layers.<N>.*``, ``N = num_hidden_layers``.

As a drafter this is an EAGLE-1 head (``spec_decode/eagle.py`` feeds it): the first draft
step reads the target's hidden states, later steps the head's own ``out``. Only the first
MTP module is used, for every draft step (vLLM does the same); the released checkpoints
have one.

The decoder layer is built by the target's own class (``make_layer`` of layer ``N``: MoE or
dense as the config says, the same attention kernel family, tensor-parallel split, routers
kept float32) in a second instance that holds that layer alone (``MTPStage``: no embedding,
no final norm, no LM head), and loaded by the target's own ``load_weights``. Its K/V lives
in its own cache over the target's block ids. The embedding is the target's, and so is the
LM head unless the checkpoint's ``shared_head.head`` differs from it (they are equal in the
released checkpoints: the copy is then dropped). A quantized target's MTP layer takes the
target's quant method (block-fp8 codes kept); the module's own parts stay dense.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from tessellm.distributed.parallel_state import PipelineStage
from tessellm.layers.linear import Linear, materialize
from tessellm.layers.vocab import ParallelLMHead, VocabParallelEmbedding

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MTPLayout:
    """How a family's checkpoint names its first MTP module: ``parts`` maps a checkpoint name
    prefix to our part (enorm, hnorm, eh_proj, final_norm, head, embed); ``block`` is the
    prefix of its decoder layer's tensors (``{n}``: ``num_hidden_layers``), which load as the
    target's layer N (``model.layers.<N>.*``)."""

    name: str
    parts: dict
    block: str
    required: tuple[str, ...]  # parts the module cannot do without
    # the module's output norm is the target's final norm (ERNIE), not a tensor of its own
    target_final_norm: bool = False
    # the module's own norms scale by ``1 + weight`` (Qwen3-Next's): the loader adds the 1
    shifted_norms: bool = False

    def prefix(self, n: int) -> str:
        return self.block.format(n=n)

    def classify(self, name: str, n: int) -> Optional[tuple[str, str]]:
        """``("part", part)``, ``("block", name as the target's layer N)`` or None (not the
        first MTP module's)."""
        for ckpt, part in self.parts.items():
            ckpt = ckpt.format(n=n)
            if name.startswith(ckpt + "."):
                return "part", part + name[len(ckpt):]
        prefix = self.prefix(n)
        if name.startswith(prefix):
            return "block", f"model.layers.{n}." + name[len(prefix):]
        return None


DEEPSEEK = MTPLayout(
    "deepseek", {f"model.layers.{{n}}.{k}": v for k, v in (
        ("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
        ("shared_head.norm", "final_norm"), ("shared_head.head", "head"),
        ("embed_tokens", "embed"))},
    "model.layers.{n}.", ("enorm", "hnorm", "eh_proj", "final_norm"))
# ERNIE 4.5 (PaddleFormers' names): one module per depth, ``.0`` the first; its output goes
# through the target's own final norm before the LM head (PaddleFormers' ``self.norm`` over the
# MTP outputs).
ERNIE = MTPLayout(
    "ernie", {"model.mtp_emb_norm.0": "enorm", "model.mtp_hidden_norm.0": "hnorm",
              "model.mtp_linear_proj.0": "eh_proj"},
    "model.mtp_block.0.", ("enorm", "hnorm", "eh_proj"), target_final_norm=True)

# Qwen3-Next: ``mtp.*`` beside the model; ``fc`` is eh_proj (embedding first), the
# ``pre_fc_norm_*`` are enorm / hnorm, ``mtp.norm`` the output norm, all (1 + w) norms; the
# decoder layer ``mtp.layers.0`` is a gated full-attention layer with the model's MoE; no copy
# of the embedding or LM head (the target's). vLLM's ``qwen3_next_mtp`` reads the same names.
QWEN3_NEXT = MTPLayout(
    "qwen3_next", {"mtp.fc": "eh_proj", "mtp.pre_fc_norm_embedding": "enorm",
                   "mtp.pre_fc_norm_hidden": "hnorm", "mtp.norm": "final_norm"},
    "mtp.layers.0.", ("enorm", "hnorm", "eh_proj", "final_norm"), shifted_norms=True)

LAYOUTS = {"DeepseekV3ForCausalLM": DEEPSEEK, "DeepseekV2ForCausalLM": DEEPSEEK,
           "Glm4MoeForCausalLM": DEEPSEEK, "Ernie4_5_MoeForCausalLM": ERNIE,
           "Qwen3NextForCausalLM": QWEN3_NEXT}
FAMILIES = "DeepSeek-V3/R1, GLM-4.5/4.6, ERNIE 4.5 MoE, Qwen3-Next"


def declared_mtp_layers(config) -> Optional[int]:
    """How many MTP modules the config says the checkpoint ships (Qwen3-Next's config names
    them ``mtp_num_hidden_layers``)."""
    return (getattr(config, "num_nextn_predict_layers", None)
            or getattr(config, "mtp_num_hidden_layers", None))


class MTPStage(PipelineStage):
    """A pipeline stage that builds only decoder layer ``index`` of the target's class: not
    the first stage (no embedding) nor the last (no final norm, no LM head)."""

    def __init__(self, index: int):
        super().__init__(stage=1, num_stages=3)
        self.index = index

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        return self.index, self.index + 1


class MTPHead(nn.Module):
    """The first MTP module over ``target`` (module docstring); ``body`` is the target's
    class holding decoder layer ``N`` alone."""

    method = "mtp"

    def __init__(self, body: nn.Module, layout: MTPLayout, target: nn.Module, ctx):
        super().__init__()
        config = body.config
        self.config = config
        self.layout = layout
        self.index = config.num_hidden_layers - 1
        self.body = body
        hidden = config.hidden_size
        # The layer's input (eh_proj's output) is whole on every rank: its input norm must not
        # sum it over the tensor ranks as a later layer's would.
        self.layer.input_layernorm = body.make_norm(config, ctx, None)
        self.enorm = body.make_norm(config, ctx, None)
        self.hnorm = body.make_norm(config, ctx, None)
        self.eh_proj = Linear(2 * hidden, [hidden], bias=False)  # replicated: reads whole inputs
        # sums the layer's partial output over the ranks (unless the family's MLP already did);
        # ERNIE: a copy of the target's final norm, filled from it
        self.final_norm = body.make_norm(config, ctx,
                                         None if body.output_summed(config) else ctx.tp)
        # The target's embedding and LM head, not registered (never loaded nor re-initialised
        # here); a checkpoint copy that differs from the target's replaces them (``own``).
        self._shared = {"embed": target.embed_tokens, "head": target.lm_head}
        self.own_embed: Optional[VocabParallelEmbedding] = None
        self.own_head: Optional[ParallelLMHead] = None

    @property
    def layer(self) -> nn.Module:
        return self.body.layers[self.index]

    @property
    def embed_tokens(self) -> nn.Module:
        return self.own_embed if self.own_embed is not None else self._shared["embed"]

    @property
    def lm_head(self) -> nn.Module:
        return self.own_head if self.own_head is not None else self._shared["head"]

    def attention_layers(self) -> list:
        return [self.layer.self_attn.attn]

    def combine(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """The target's final hidden states, as the first draft step reads them."""
        return target_hidden

    def forward(self, input_ids, positions, metadata, hidden):
        """``hidden``: [T, H], the target's (first step) or the previous step's ``out``.
        Returns ``(normed states for logits, out for the next draft step)``."""
        embeds = self.enorm(self.embed_tokens(input_ids))
        x = self.eh_proj(torch.cat([embeds, self.hnorm(hidden)], dim=-1))
        x, residual = self.layer(positions, x, None, metadata)
        normed, out = self.final_norm(x, residual)
        return normed, out

    def draft_tokens(self, states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(states).argmax(dim=-1)


# -- building and loading --------------------------------------------------------------------

def mtp_layout(config) -> Optional[MTPLayout]:
    for arch in getattr(config, "architectures", None) or ():
        if arch in LAYOUTS:
            return LAYOUTS[arch]
    return None


def checkpoint_tensor_names(path: str) -> list[str]:
    """Every tensor name of a safetensors checkpoint directory (from the index, else the
    files' headers)."""
    import json

    from safetensors import safe_open

    from tessellm.loader.safetensors_loader import safetensors_files

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return list(json.load(f)["weight_map"])
    names = []
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            names.extend(f.keys())
    return names


def check_mtp_checkpoint(source, layout: Optional[MTPLayout], load_format: str) -> None:
    """One sentence for a target that has no MTP module to draft with."""
    config = source.hf_config
    arch = ", ".join(getattr(config, "architectures", None) or ["?"])
    if layout is None:
        raise ValueError(f"speculative_config method 'mtp' drafts with a checkpoint's own "
                         f"multi-token-prediction layers, which tessellm reads for {FAMILIES}; "
                         f"{arch} has none: use method ngram, draft_model or eagle instead.")
    n = config.num_hidden_layers
    declared = declared_mtp_layers(config)
    if load_format == "dummy":
        if not declared:
            raise ValueError(f"The model's config sets no num_nextn_predict_layers (Qwen3-Next: "
                             f"mtp_num_hidden_layers), so it has no "
                             f"multi-token-prediction layers for speculative_config method "
                             f"'mtp'; use method ngram, draft_model or eagle instead.")
        return
    if source.kind != "dir":
        raise ValueError("speculative_config method 'mtp' reads the MTP layers from a "
                         "safetensors checkpoint directory; a GGUF file carries none: serve the "
                         "original checkpoint or use method ngram.")
    prefix = layout.prefix(n)
    if not any(name.startswith(prefix) for name in checkpoint_tensor_names(source.path)):
        raise ValueError(f"The checkpoint at {source.path} has no multi-token-prediction layer "
                         f"(no {prefix}* tensors; num_nextn_predict_layers={declared}), which "
                         f"speculative_config method 'mtp' drafts with: serve a checkpoint that "
                         f"ships them (e.g. the original {arch} weights) or use method ngram.")


def build_mtp_head(target: nn.Module, source, registry, backend, block_size: int,
                   kv_cache_dtype: str = "auto", load_format: str = "auto", seed: int = 0,
                   max_model_len: Optional[int] = None, max_num_seqs: Optional[int] = None):
    """``(head, attention kernel)``: the first MTP module of ``source`` (the target's own
    checkpoint) over ``target`` (built by ``build_model``: its ``model_context`` is reused),
    its weights filled (``load_format="dummy"``: random, for benchmarks). ``max_model_len`` /
    ``max_num_seqs``: the drafter's limits, in its kernels' ``AttentionSpec`` (None: unknown)."""
    from tessellm.config import text_config
    from tessellm.layers.attention import PerWindowKernels
    from tessellm.layers.linear import use_backend_linear
    from tessellm.loader.model_loader import attention_kernel_factory

    target_ctx = target.model_context
    layout = mtp_layout(source.hf_config)
    check_mtp_checkpoint(source, layout, load_format)
    quant_spec = target_ctx.quant_spec if target_ctx.quant_method is not None else None
    declared = declared_mtp_layers(source.hf_config) or 1
    if declared > 1:
        logger.info("Speculative decoding (mtp): the checkpoint has %d MTP modules; the first "
                    "drafts every step (as vLLM does)", declared)
    config = copy.deepcopy(text_config(source.hf_config))
    n = config.num_hidden_layers
    config.num_hidden_layers = n + 1
    if layout is ERNIE:
        _ernie_block_mlp(config, n, source, load_format)
    if layout is QWEN3_NEXT:  # the MTP layer attends in full (no recurrent state of its own)
        config.layer_types = list(config.layer_types[:n]) + ["full_attention"]
    make_kernel, kernels = attention_kernel_factory(registry, backend, config, target_ctx.dtype,
                                                    block_size, kv_cache_dtype, target_ctx.tp,
                                                    max_model_len, max_num_seqs)
    ctx = dataclasses.replace(target_ctx, make_attention_kernel=make_kernel, pp=MTPStage(n))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(ctx.dtype)
    try:
        with torch.device(ctx.device):
            body = type(target)(config, ctx)
            head = MTPHead(body, layout, target, ctx)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy" and quant_spec is None:
        from tessellm.loader.dummy import init_dummy_weights

        init_dummy_weights(head, seed)
    elif load_format == "dummy":
        from tessellm.quantization.loading import init_dummy_quantized

        init_dummy_quantized(head, seed)
    else:
        _load(head, source.path, n, quant_spec)
    if quant_spec is not None:
        from tessellm.quantization.loading import process_quantized

        process_quantized(head)
    if layout.target_final_norm:
        head.final_norm.weight.data.copy_(target.norm.weight.data)
    use_backend_linear(head, ctx.ops)
    head.eval()
    kernel = (PerWindowKernels(kernels.values()) if len(kernels) > 1
              else next(iter(kernels.values())))
    return head, kernel


def _ernie_block_mlp(config, n: int, source, load_format: str) -> None:
    """ERNIE's MTP decoder layer is dense in vLLM's reading (a Llama layer) and MoE where the
    checkpoint has experts for it: the copied config's MoE layer range is set to say which."""
    moe = False
    if load_format != "dummy" and source.kind == "dir":
        prefix = ERNIE.prefix(n) + "mlp."
        moe = any(name.startswith(prefix + "experts.") or name.startswith(prefix + "gate.")
                  for name in checkpoint_tensor_names(source.path))
    end = getattr(config, "moe_layer_end_index", None)
    end = n - 1 if end is None or end < 0 else end
    config.moe_layer_end_index = max(end, n) if moe else min(end, n - 1)


def _load(head: MTPHead, path: str, n: int, quant_spec=None) -> None:
    """The first MTP module's tensors: its decoder layer through the target class's loader
    (the quantized loader for a quantized target: fp8 codes and scales kept, or quantized as
    they load), its own parts dense (a pre-quantized checkpoint's fp8 ``eh_proj`` or head copy
    dequantized as DeepSeek's MLA projections are)."""
    from tessellm.loader.safetensors_loader import iter_safetensors_weights

    dtype = head.eh_proj.weight.dtype
    parts: dict[str, torch.Tensor] = {}
    loaded_parts: set[str] = set()
    prequantized = quant_spec is not None and quant_spec.config.get("prequantized")
    if prequantized:
        from tessellm.quantization.fp8_block import dequantized_stream
        from tessellm.quantization.loading import iter_prequantized_safetensors

        block = quant_spec.config.get("weight_block_size")
        stream = dequantized_stream(
            iter_prequantized_safetensors(path, dtype), tuple(block) if block else None,
            lambda name: (head.layout.classify(name, n) or ("",))[0] == "part")
    else:
        stream = iter_safetensors_weights(path, dtype, lazy=True)

    def block_tensors():
        for name, tensor in stream:
            kind = head.layout.classify(name, n)
            if kind is None:
                continue
            if kind[0] == "block":
                yield kind[1], tensor
            else:
                _load_part(head, kind[1], tensor, parts, path)
                loaded_parts.add(kind[1].split(".")[0])

    if quant_spec is not None:
        from tessellm.quantization.loading import load_quantized_weights

        loaded = load_quantized_weights(head.body, block_tensors())
    else:
        loaded = head.body.load_weights(block_tensors())
    missing = sorted(set(n for n, _ in head.body.named_parameters()) - loaded)
    missing += [p for p in head.layout.required if p not in loaded_parts]
    if missing:
        raise ValueError(f"The multi-token-prediction layer of the checkpoint at {path} lacks "
                         f"{len(missing)} weights, e.g. {missing[:3]}; is the checkpoint complete?")
    _share_copies(head, parts)


def _load_part(head: MTPHead, name: str, tensor, parts: dict, path: str) -> None:
    part, _, attr = name.partition(".")
    if part in ("enorm", "hnorm", "final_norm"):
        param = getattr(head, part).weight
        value = materialize(tensor)
        if head.layout.shifted_norms:
            value = value + 1
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"The MTP layer's {part} at {path} has shape {tuple(value.shape)}, "
                             f"expected {tuple(param.shape)}; the config does not match the weights.")
        param.data.copy_(value)
    elif part == "eh_proj":
        if attr != "weight":
            raise ValueError(f"The MTP layer's eh_proj at {path} has a {attr!r}, which the "
                             f"{head.layout.name} layout does not; is this the right architecture?")
        try:
            head.eh_proj.load_shard("weight", tensor, None)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"The MTP layer's eh_proj at {path} does not fit the config: {e}") from None
    elif part in ("head", "embed"):
        shared = head._shared[part]
        cfg = head.config
        cls = ParallelLMHead if part == "head" else VocabParallelEmbedding
        with torch.device(head.eh_proj.weight.device):
            own = cls(cfg.vocab_size, cfg.hidden_size, shared.tp)
        own.weight.data = own.weight.data.to(head.eh_proj.weight.dtype)
        own.load_weight(tensor)
        parts[part] = own
    else:  # never: the layout names only these parts
        raise ValueError(f"Unexpected MTP tensor {name!r} at {path}.")


def _share_copies(head: MTPHead, parts: dict) -> None:
    """The checkpoint's copies of the embedding and LM head: dropped where they equal the
    target's (the released checkpoints: the memory of one vocab x hidden table each), kept as
    the head's own otherwise."""
    for part, own in parts.items():
        shared = head._shared[part]
        weight = getattr(shared, "tied", None)
        weight = shared.weight if weight is None else weight
        if weight.shape == own.weight.shape and torch.equal(weight, own.weight):
            continue
        if part == "head":
            head.own_head = own
        else:
            head.own_embed = own

