"""OLMo 2 (``Olmo2ForCausalLM``) on tiny random models: norms after each sublayer and q/k
RMSNorm over all heads at once; greedy tokens and per-token log-probabilities equal HF
transformers' in float32, under chunked prefill, and at tensor_parallel_size=2 (gloo) where
each rank norms its heads with the squares summed over both ranks (KV heads split, and one KV
head replicated on both ranks)."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny


def olmo2_config(**overrides):
    from transformers import Olmo2Config

    return Olmo2Config(**{**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                          **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    (dict(num_key_value_heads=1, attention_bias=True), dict(max_num_batched_tokens=8)),
    (dict(head_dim=32, tie_word_embeddings=True), dict()),
], ids=["plain", "mqa-bias-chunked", "head-dim-32-tied"])
def test_olmo2_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(olmo2_config(**overrides), str(tmp_path / "olmo2"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
def test_olmo2_tensor_parallel(kv_heads, tmp_path):
    path = save_tiny(olmo2_config(num_key_value_heads=kv_heads), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")
