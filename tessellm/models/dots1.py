"""dots.llm1 (``Dots1ForCausalLM``: dots.llm1.base / .inst): GLM-4.5's build (``glm4_moe.py``:
llama attention on DeepSeek-V3's MoE) with Qwen3's attention: per-head q/k RMSNorm always,
rotary over the whole head, ``attention_bias`` on q/k/v and o_proj alike, and sliding-window
layers per ``layer_types``."""

from __future__ import annotations

from typing import Optional

from tessellm.models.glm4_moe import Glm4MoeForCausalLM
from tessellm.models.layer_windows import window_by_layer_type
from tessellm.models.llama import LlamaForCausalLM


class Dots1ForCausalLM(Glm4MoeForCausalLM):
    def uses_qk_norm(self, config) -> bool:
        return True

    def attention_biases(self, config) -> tuple[bool, bool]:
        return LlamaForCausalLM.attention_biases(self, config)  # llama's, not GLM-4.5's

    def layer_window(self, config, index: int) -> Optional[int]:
        return window_by_layer_type(config, index)
