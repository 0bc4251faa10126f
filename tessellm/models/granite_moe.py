"""Granite MoE (``GraniteMoeForCausalLM``: granite-3.0-1b-a400m, 3b-a800m): Granite's four
scalars (``models/granite.py``) on Mixtral's sparse layers (``models/moe.py``).

The checkpoint stacks each layer's experts in one tensor per projection; they load as the
per-expert projections Mixtral's loader takes::

    block_sparse_moe.input_linear.weight   [E, 2I, H]  rows [ gate: I | up: I ]  -> w1, w3
    block_sparse_moe.output_linear.weight  [E, H, I]                             -> w2
    block_sparse_moe.router.layer.weight   [E, H]                                -> the router

Routing: softmax over the top-k router logits, i.e. softmax top-k renormalized, as Mixtral.

``GraniteMoeSharedForCausalLM`` adds a dense SwiGLU MLP beside the experts, ungated
(``moe(x) + shared_mlp(x)``; ``shared_intermediate_size`` 0: none), whose checkpoint tensors
are fused too: ``shared_mlp.input_linear.weight [gate: S | up: S]`` and ``output_linear``.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.linear import materialize
from tessellm.layers.moe import SparseMoeBlock
from tessellm.models.decoder import DecoderMLP
from tessellm.models.granite import GraniteForCausalLM
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.moe import MixtralForCausalLM
from tessellm.quantization.stored_parts import (checkpoint_block_rows, checkpoint_packing,
                                                split_rows)

_MOE = ".block_sparse_moe."


class GraniteMoeForCausalLM(GraniteForCausalLM, MixtralForCausalLM):
    int4_experts = False  # stacked 3-D experts: AWQ / GPTQ checkpoints keep them float

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


class SharedMlpMoeBlock(nn.Module):
    """A sparse block's router and experts (the same modules, same names) plus an ungated
    dense ``shared_mlp``; both outputs are partial sums under tensor parallelism."""

    def __init__(self, block: SparseMoeBlock, shared_mlp: DecoderMLP):
        super().__init__()
        self.gate, self.experts, self.shared_mlp = block.gate, block.experts, shared_mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x)) + self.shared_mlp(x)


class GraniteMoeSharedForCausalLM(GraniteMoeForCausalLM):
    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        block = super().make_mlp(config, ctx, index)
        size = getattr(config, "shared_intermediate_size", 0) or 0
        return SharedMlpMoeBlock(block, DecoderMLP(config, ctx, size)) if size else block

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        """The shared MLP's fused tensors cut here, where the quantized loader sees them too
        (cut in ``load_weights`` they reached a quantized model's loader as names it had no
        place for)."""
        size = getattr(self.config, "shared_intermediate_size", 0) or 0
        return shared_mlp_names(super().checkpoint_names(weights), size, ".mlp.shared_mlp.",
                                checkpoint_block_rows(self.config),
                                checkpoint_packing(self.config))


def shared_mlp_names(weights, size: int, into: str, block_rows: Optional[int] = None,
                     packing: Optional[str] = None):
    """The fused ``shared_mlp.input_linear`` cut into ``{into}gate_proj`` / ``up_proj`` (``size``
    rows each) and ``shared_mlp.output_linear`` renamed ``{into}down_proj``; others as they are.
    ``into``: ".mlp.shared_mlp." beside experts, ".mlp." where it is the layer's only MLP;
    ``block_rows``: a block-wise fp8 checkpoint's block rows (its scales are cut by blocks);
    ``packing``: "awq" / "gptq" for an int4 checkpoint (its tensors cut by output columns)."""
    for name, tensor in weights:
        if ".shared_mlp.input_linear." in name:  # the weight, its fp8 scales or int4 tensors
            head, _, piece = name.partition(".shared_mlp.input_linear.")
            gate, up = split_rows(piece, tensor, [size, size], block_rows=block_rows,
                                  where=head + ".shared_mlp.input_linear", packing=packing)
            yield f"{head}{into}gate_proj.{piece}", gate
            yield f"{head}{into}up_proj.{piece}", up
        else:
            yield name.replace(".shared_mlp.output_linear.", into + "down_proj."), tensor
