"""dots.llm1 (``Dots1ForCausalLM``) on tiny random models: Qwen3's attention (per-head q/k
RMSNorm, biases per ``attention_bias``, sliding layers per ``layer_types``) on DeepSeek-V3's
MoE (sigmoid grouped router with its correction bias, shared experts, dense first layers);
greedy tokens and per-token log-probabilities equal HF transformers' in float32, under
chunked prefill too."""

from __future__ import annotations

import pytest

from tests.models.test_deepseek import save_deepseek
from tests.models.test_glm4_moe import MOE
from tests.models.variant_parity import TINY, assert_parity, prompts


def dots1_config(**overrides):
    from transformers import Dots1Config

    return Dots1Config(**{**TINY, **MOE, "num_hidden_layers": 3, "n_group": 4, "topk_group": 2,
                          "norm_topk_prob": True, "routed_scaling_factor": 2.0,
                          "sliding_window": None, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict(max_num_batched_tokens=8)),
    (dict(attention_bias=True, sliding_window=8, max_window_layers=1, n_group=1, topk_group=1,
          norm_topk_prob=False, tie_word_embeddings=True), dict()),  # layers 1, 2 slide
], ids=["grouped-chunked", "bias-window-8-ungrouped-tied"])
def test_dots1_matches_hf(overrides, engine, tmp_path):
    path = save_deepseek(dots1_config(**overrides), str(tmp_path / "dots1"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)
