"""Cohere 2 (``Cohere2ForCausalLM``: Command R7B / A) on tiny random models: Cohere's parallel
block with sliding-window layers (interleaved rotary) between global NoPE layers, and
``logit_scale``; greedy tokens and per-token log-probabilities equal HF transformers' in
float32, under chunked prefill too."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny

SLIDING, FULL = "sliding_attention", "full_attention"


def cohere2_config(**overrides):
    from transformers import Cohere2Config

    return Cohere2Config(**{**TINY, "num_hidden_layers": 4, "sliding_window": 8,
                            "layer_types": [SLIDING, SLIDING, SLIDING, FULL], "logit_scale": 0.5,
                            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                            **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict(max_num_batched_tokens=8)),
    (dict(layer_types=[SLIDING, FULL, SLIDING, FULL], attention_bias=True, num_key_value_heads=1,
          tie_word_embeddings=False, logit_scale=1.0), dict()),
], ids=["3-local-1-global-tied-chunked", "alternating-bias-mqa-untied"])
def test_cohere2_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(cohere2_config(**overrides), str(tmp_path / "cohere2"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# Slow lane (ci/matrix.yaml's cpu lane): Cohere's parallel block under TP is test_cohere.py's.
@pytest.mark.slow
def test_cohere2_tensor_parallel(tmp_path):
    path = save_tiny(cohere2_config(), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")
