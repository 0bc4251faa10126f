"""Phi (``PhiForCausalLM``, phi-1.5 / phi-2) on tiny random models: the parallel attention +
MLP block on one LayerNorm with weight and bias, partial rotary, gelu_new, biases on every
projection and on the LM head; greedy tokens and per-token log-probabilities equal HF
transformers' in float32, under chunked prefill and at tensor_parallel_size=2 (gloo); the
option not implemented is refused naming it."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import (TINY, assert_parity, assert_refused_at_load, prompts,
                                         save_tiny)


def phi_config(**overrides):
    from transformers import PhiConfig

    return PhiConfig(**{**TINY, "num_key_value_heads": 4, "pad_token_id": 0, "bos_token_id": 1,
                        "eos_token_id": 2, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    (dict(num_key_value_heads=1, tie_word_embeddings=True, partial_rotary_factor=0.25),
     dict(max_num_batched_tokens=8)),
    (dict(hidden_act="gelu", head_dim=32), dict()),
], ids=["phi-2-like", "mqa-tied-quarter-rotary-chunked", "gelu-head-dim-32"])
def test_phi_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(phi_config(**overrides), str(tmp_path / "phi"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


def test_phi_tensor_parallel(tmp_path):
    """Each rank's dense and fc2 sum their own outputs (both have biases) and add the bias
    once; the LM head's bias is added to the gathered logits."""
    path = save_tiny(phi_config(), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


def test_phi_qk_layernorm_refused(tmp_path):
    assert_refused_at_load(phi_config(qk_layernorm=True), "PhiForCausalLM", tmp_path,
                           "Phi config qk_layernorm=True is not supported")
