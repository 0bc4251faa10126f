"""Starcoder2 (``Starcoder2ForCausalLM``) on tiny random models: LayerNorms with weight and
bias, biases on every projection (``use_bias``), the gelu MLP without a gate (c_fc/c_proj) and
a sliding window shorter than the prompts; greedy tokens and per-token log-probabilities equal
HF transformers' in float32, under chunked prefill and at tensor_parallel_size=2 (gloo)."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import (TINY, assert_parity, assert_refused_at_load, prompts,
                                         save_tiny)


def starcoder2_config(**overrides):
    from transformers import Starcoder2Config

    return Starcoder2Config(**{**TINY, "tie_word_embeddings": True, "pad_token_id": 0,
                               "bos_token_id": 1, "eos_token_id": 2, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    (dict(sliding_window=8, num_key_value_heads=1, tie_word_embeddings=False),
     dict(max_num_batched_tokens=8)),
    (dict(use_bias=False, hidden_act="gelu"), dict()),
], ids=["bias-tied", "window-8-mqa-chunked", "no-bias-gelu"])
def test_starcoder2_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(starcoder2_config(**overrides), str(tmp_path / "starcoder2"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# no-bias is the bias case less its biases: it runs in the slow lane (ci/matrix.yaml's cpu lane).
@pytest.mark.parametrize("use_bias", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["bias", "no-bias"])
def test_starcoder2_tensor_parallel(use_bias, tmp_path):
    """c_fc's rows and c_proj's columns split over the ranks; with biases each projection sums
    its own output, without them the next LayerNorm sums the partial outputs."""
    path = save_tiny(starcoder2_config(use_bias=use_bias, sliding_window=8), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


def test_starcoder2_unsupported_activation_refused(tmp_path):
    assert_refused_at_load(starcoder2_config(hidden_act="gelu_10"), "Starcoder2ForCausalLM",
                           tmp_path, "Starcoder2 config hidden_act='gelu_10' is not supported")
