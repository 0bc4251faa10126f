"""GLM-4.5 / 4.6 (``Glm4MoeForCausalLM``) on tiny random models: llama attention with half
rotary (NeoX halves) and optional per-head q/k RMSNorm, DeepSeek-V3's sigmoid grouped router
with its correction bias, shared experts and ``first_k_dense_replace`` dense layers; greedy
tokens and per-token log-probabilities equal HF transformers' in float32, under chunked
prefill too."""

from __future__ import annotations

import pytest

from tests.models.test_deepseek import save_deepseek
from tests.models.variant_parity import TINY, assert_parity, prompts

MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
           n_shared_experts=1, first_k_dense_replace=1)


def glm4_moe_config(**overrides):
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(**{**TINY, **MOE, "num_hidden_layers": 3, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(use_qk_norm=True, n_group=4, topk_group=2, routed_scaling_factor=2.5),
     dict(max_num_batched_tokens=8)),
    (dict(attention_bias=True, norm_topk_prob=False, n_shared_experts=2,
          tie_word_embeddings=True), dict()),
], ids=["qk-norm-grouped-scaled-chunked", "qkv-bias-unnormalized-2-shared-tied"])
def test_glm4_moe_matches_hf(overrides, engine, tmp_path):
    path = save_deepseek(glm4_moe_config(**overrides), str(tmp_path / "glm4moe"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# Slow lane (ci/matrix.yaml's cpu lane): per-head q/k norms under TP are qwen3's and V3's MoE
# under TP test_deepseek.py's, by default.
@pytest.mark.slow
def test_glm4_moe_tensor_parallel(tmp_path):
    path = save_deepseek(glm4_moe_config(use_qk_norm=True, n_group=4, topk_group=2),
                         str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


def test_glm4_moe_block_fp8_serves_the_dequantized_model(tmp_path):
    """As GLM-4.5-FP8 is published (block-wise fp8, 128x128): attention, dense MLP, shared and
    routed experts keep fp8 codes; the router and the q/k norms stay dense. Greedy tokens equal
    the dequantized checkpoint's, served by tessellm and by HF."""
    from tests.quantization.block_fp8_checkpoint import (assert_serves_dequantized,
                                                         checkpoint_maker)

    config = glm4_moe_config(hidden_size=128, head_dim=32, intermediate_size=192,
                             moe_intermediate_size=128, use_qk_norm=True, n_group=4,
                             topk_group=2, routed_scaling_factor=2.5, initializer_range=0.1,
                             num_hidden_layers=2)
    make = checkpoint_maker(tmp_path, {"glm4-moe": config}, seed=11)
    assert_serves_dequantized(*make("glm4-moe"), prompts((6, 3, 40)), 12)
