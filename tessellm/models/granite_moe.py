"""Granite MoE (``GraniteMoeForCausalLM``: granite-3.0-1b-a400m, 3b-a800m): Granite's four
scalars (``models/granite.py``) on Mixtral's sparse layers (``models/moe.py``).

The checkpoint stacks each layer's experts in one tensor per projection; they load as the
per-expert projections Mixtral's loader takes::

    block_sparse_moe.input_linear.weight   [E, 2I, H]  rows [ gate: I | up: I ]  -> w1, w3
    block_sparse_moe.output_linear.weight  [E, H, I]                             -> w2
    block_sparse_moe.router.layer.weight   [E, H]                                -> the router

Routing: softmax over the top-k router logits, i.e. softmax top-k renormalized, as Mixtral.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from tessellm.layers.linear import materialize
from tessellm.models.granite import GraniteForCausalLM
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.moe import MixtralForCausalLM

_MOE = ".block_sparse_moe."


class GraniteMoeForCausalLM(GraniteForCausalLM, MixtralForCausalLM):
    def attention_biases(self, config) -> tuple[bool, bool]:
        return LlamaForCausalLM.attention_biases(self, config)  # Granite's, not Mixtral's

    def layer_window(self, config, index: int) -> Optional[int]:
        return None

    def check_config(self, config) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Granite MoE hidden_act {act!r} is not supported; only silu is "
                             "(the fused MoE experts are SwiGLU).")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        inter = self.config.intermediate_size

        def per_expert():
            for name, tensor in weights:
                if _MOE + "input_linear.weight" in name:
                    stacked = materialize(tensor)
                    prefix = name.replace(_MOE + "input_linear.weight", ".mlp.experts.")
                    for e, (gate, up) in enumerate(s.split([inter, inter]) for s in stacked):
                        yield f"{prefix}{e}.w1.weight", gate
                        yield f"{prefix}{e}.w3.weight", up
                elif _MOE + "output_linear.weight" in name:
                    prefix = name.replace(_MOE + "output_linear.weight", ".mlp.experts.")
                    for e, down in enumerate(materialize(tensor)):
                        yield f"{prefix}{e}.w2.weight", down
                else:
                    yield name.replace(_MOE + "router.layer.", ".mlp.gate."), tensor

        return super().load_weights(per_expert())
