"""Cohere 2 (``Cohere2ForCausalLM``: Command R7B, Command A): Cohere's parallel block,
LayerNorm, interleaved rotary and ``logit_scale`` (``cohere.py``), with sliding-window layers
interleaved with global ones per ``layer_types`` (three sliding, then one global, in the
released configs), where only the sliding layers rotate q and k: the global ones are NoPE."""

from __future__ import annotations

from typing import Optional

from tessellm.models.cohere import CohereForCausalLM
from tessellm.models.layer_windows import window_by_layer_type


class Cohere2ForCausalLM(CohereForCausalLM):
    def layer_window(self, config, index: int) -> Optional[int]:
        return window_by_layer_type(config, index)

    def rotates(self, config, index: int) -> bool:
        return self.layer_window(config, index) is not None  # HF: rope where it slides

    def check_config(self, config) -> None:
        types = getattr(config, "layer_types", None)
        if not types or len(types) != config.num_hidden_layers:
            raise ValueError(f"Cohere 2 config layer_types={types!r} is not supported: it must "
                             f"name each of the {config.num_hidden_layers} layers' attention.")
