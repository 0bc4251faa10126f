"""Mixture-of-experts GGUF architectures: ``qwen2moe`` and ``qwen3moe``, onto tessellm's
``Qwen2MoeForCausalLM`` / ``Qwen3MoeForCausalLM``.

llama.cpp's converter stacks each layer's experts into one tensor per projection:
``ffn_gate_exps`` / ``ffn_up_exps`` (torch shape [experts, expert size, hidden]) and
``ffn_down_exps`` ([experts, hidden, expert size]); the loader cuts them back into HF's
``mlp.experts.<e>.gate_proj|up_proj|down_proj`` (always dequantized: the fused experts keep no
GGUF blocks). ``ffn_gate_inp`` is the router (``mlp.gate``); qwen2moe adds the shared expert
(``ffn_*_shexp``) and its sigmoid gate ``ffn_gate_inp_shexp``, which the files hold as a vector
of ``hidden`` (HF's is [1, hidden]; a [1, hidden] one loads as well).

Config: ``expert_count``, ``expert_used_count``, ``expert_feed_forward_length`` (HF's
``moe_intermediate_size``), ``expert_shared_feed_forward_length``; llama.cpp renormalizes the
top-k weights for qwen3moe and not for qwen2moe (``expert_weights_norm`` overrides). Every
layer is sparse (llama.cpp has no dense layers for these architectures: no ``mlp_only_layers``).
"""

from __future__ import annotations

import re

import torch

MOE_ARCHS = ("qwen2moe", "qwen3moe")

_ROUTER = {"ffn_gate_inp": "mlp.gate"}
MOE_LAYER_NAMES = {
    "qwen2moe": {**_ROUTER, "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
                 "ffn_up_shexp": "mlp.shared_expert.up_proj",
                 "ffn_down_shexp": "mlp.shared_expert.down_proj",
                 "ffn_gate_inp_shexp": "mlp.shared_expert_gate"},
    "qwen3moe": {**_ROUTER, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
}

EXPERT_PARTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def moe_fields(arch: str, hp, tensor_names: set) -> dict:
    """The HF MoE config fields of a ``qwen2moe`` / ``qwen3moe`` file."""
    fields = dict(num_experts=hp("expert_count"), num_experts_per_tok=hp("expert_used_count"),
                  moe_intermediate_size=hp("expert_feed_forward_length"),
                  norm_topk_prob=bool(hp("expert_weights_norm", arch == "qwen3moe")),
                  mlp_only_layers=[], decoder_sparse_step=1)
    if arch == "qwen2moe":
        shared = "blk.0.ffn_gate_shexp.weight" in tensor_names
        fields["shared_expert_intermediate_size"] = (
            hp("expert_shared_feed_forward_length") if shared else 0)
        fields["use_sliding_window"] = False
    return fields


def split_experts(hf_layer: str, kind: str, stacked: torch.Tensor, dtype: torch.dtype):
    """``(name, tensor)`` per expert of one stacked ``ffn_*_exps`` tensor of layer
    ``hf_layer`` (``model.layers.<i>``)."""
    part = EXPERT_PARTS[kind]
    for expert, weight in enumerate(stacked.unbind(0)):
        yield f"{hf_layer}.mlp.experts.{expert}.{part}.weight", weight.to(dtype)


def expert_kind(gguf_name: str) -> tuple[str, str] | None:
    """(``model.layers.<i>``, stacked kind) of an ``ffn_*_exps`` tensor name, else None."""
    match = re.fullmatch(r"blk\.(\d+)\.(ffn_(?:gate|up|down)_exps)\.weight", gguf_name)
    return (f"model.layers.{match[1]}", match[2]) if match else None
