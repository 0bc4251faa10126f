"""EXAONE 3.0 / 3.5 (``ExaoneForCausalLM``): the Llama architecture under other names.
transformers 5 serves it with its Llama model, renaming the checkpoint's tensors on load; so do
we (the same renames, ``_RENAMES``). The config's own field names (``num_layers``,
``layer_norm_epsilon``, ``activation_function``) are aliases ``ExaoneConfig`` resolves."""

from __future__ import annotations

import re
from typing import Iterable

import torch

from tessellm.models.llama import LlamaForCausalLM

_RENAMES = tuple((re.compile(a), b) for a, b in (
    (r"^transformer\.wte\.", "model.embed_tokens."),
    (r"^transformer\.h\.", "model.layers."),
    (r"^transformer\.ln_f\.", "model.norm."),
    (r"\.attn\.attention\.out_proj\.", ".self_attn.o_proj."),
    (r"\.attn\.attention\.", ".self_attn."),
    (r"\.ln_1\.", ".input_layernorm."),
    (r"\.ln_2\.", ".post_attention_layernorm."),
    (r"\.mlp\.c_fc_0\.", ".mlp.gate_proj."),
    (r"\.mlp\.c_fc_1\.", ".mlp.up_proj."),
    (r"\.mlp\.c_proj\.", ".mlp.down_proj."),
))


def llama_name(name: str) -> str:
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name


class ExaoneForCausalLM(LlamaForCausalLM):
    """Llama's switches (``attention_bias``, ``mlp_bias``, no window)."""

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        return ((llama_name(name), tensor) for name, tensor in weights)
