"""OLMoE (``OlmoeForCausalLM``) on tiny random models (4 experts): pre-norm layers with q/k
RMSNorm over all heads and sparse MoE MLPs; greedy tokens and per-token log-probabilities equal
HF transformers' in float32 (top-k renormalized and not), under chunked prefill and at
tensor_parallel_size=2 (gloo)."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny


def olmoe_config(**overrides):
    from transformers import OlmoeConfig

    return OlmoeConfig(**{**TINY, "intermediate_size": 32, "num_experts": 4,
                          "num_experts_per_tok": 2, "pad_token_id": 0, "bos_token_id": 1,
                          "eos_token_id": 2, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    (dict(norm_topk_prob=True, num_key_value_heads=1, attention_bias=True,
          tie_word_embeddings=True), dict(max_num_batched_tokens=8)),
], ids=["plain", "renormalized-mqa-bias-tied-chunked"])
def test_olmoe_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(olmoe_config(**overrides), str(tmp_path / "olmoe"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# Slow lane (ci/matrix.yaml's cpu lane): OLMo 2's whole-projection q/k norms with replicated KV
# heads under TP are test_olmo2.py's, experts under TP tests/distributed/test_moe_parallel.py's.
@pytest.mark.slow
def test_olmoe_tensor_parallel(tmp_path):
    path = save_tiny(olmoe_config(num_key_value_heads=1), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")
