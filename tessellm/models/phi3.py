"""Phi-3 (``Phi3ForCausalLM``): the llama decoder with q/k/v fused into one ``qkv_proj`` and
gate/up into one ``gate_up_proj`` in the checkpoint, and LongRoPE ("su"/"longrope") scaling
(``layers/rotary.py``).

The fused checkpoint tensors are split into their logical parts on load, so each lands in our
fused layers' shards exactly as separate ``q_proj``/``k_proj``/... tensors would (and tensor
parallelism narrows each part on its own)::

    qkv_proj.weight rows   [ q: H*d | k: KVH*d | v: KVH*d ]  -> q_proj, k_proj, v_proj
    gate_up_proj.weight    [ gate: I | up: I ]               -> gate_proj, up_proj
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from tessellm.layers.linear import materialize
from tessellm.layers.rope_config import rope_parameters
from tessellm.models.llama import MistralForCausalLM

logger = logging.getLogger(__name__)


class Phi3ForCausalLM(MistralForCausalLM):
    """Mistral's switches: no biases, ``sliding_window`` on every layer (Phi-3-mini-4k: 2047).
    Partial rotary (``partial_rotary_factor``, e.g. Phi-4-mini's 0.75) comes from the config."""

    def check_config(self, config) -> None:
        params = rope_parameters(config)
        original = params.get("original_max_position_embeddings")
        if params["rope_type"] in ("longrope", "su") and config.max_position_embeddings > original:
            logger.warning(
                "LongRoPE: sequences longer than original_max_position_embeddings=%d use the long "
                "factors from that position on and keep the short ones below it; HF transformers "
                "re-rotates the whole sequence with the long factors, so past %d tokens outputs "
                "differ from HF's.", original, original)
    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        """The fused tensors cut into their parts (module docstring), here rather than in
        ``load_weights`` so that quantizing on load and GGUF blocks kept quantized see the
        parts too (a quantized fused layer takes its logical shards one by one)."""
        config = self.config
        d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        qkv_sizes = [config.num_attention_heads * d, kv * d, kv * d]
        inter = config.intermediate_size

        def split():
            for name, tensor in weights:
                if name.endswith(".qkv_proj.weight"):
                    parts = _split_rows(tensor, qkv_sizes)
                    for part, piece in zip(("q_proj", "k_proj", "v_proj"), parts):
                        yield name.replace(".qkv_proj.", f".{part}."), piece
                elif name.endswith(".gate_up_proj.weight"):
                    gate, up = _split_rows(tensor, [inter, inter])
                    yield name.replace(".gate_up_proj.", ".gate_proj."), gate
                    yield name.replace(".gate_up_proj.", ".up_proj."), up
                else:
                    yield name, tensor

        return split()


def _split_rows(tensor, sizes: list[int]):
    """A checkpoint tensor (lazy or not), or GGUF blocks kept quantized (``split_rows``), cut
    into consecutive runs of ``sizes`` output rows."""
    if hasattr(tensor, "split_rows"):
        return tensor.split_rows(sizes)
    return materialize(tensor).split(sizes, dim=0)
