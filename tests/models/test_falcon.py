"""Falcon (``FalconForCausalLM``) on tiny random models, each layer shape and query_key_value
layout: 7B's multi-query parallel block on one LayerNorm, 40B/180B's new decoder architecture
(grouped q/k/v, two LayerNorms, or one), the sequential residual with per-head q/k/v, biases;
greedy tokens and per-token log-probabilities equal HF transformers' in float32, under chunked
prefill and at tensor_parallel_size=2 (gloo); ALiBi is refused naming it."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import (assert_parity, assert_refused_at_load, prompts,
                                         save_tiny)

TINY_FALCON = dict(vocab_size=128, hidden_size=64, ffn_hidden_size=96, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=128, initializer_range=0.2)


def falcon_config(**overrides):
    from transformers import FalconConfig

    return FalconConfig(**{**TINY_FALCON, "pad_token_id": 0, "bos_token_id": 1,
                           "eos_token_id": 2, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),  # 7B: multi_query, parallel_attn, tied
    (dict(new_decoder_architecture=True, num_kv_heads=2, tie_word_embeddings=False),
     dict(max_num_batched_tokens=8)),
    (dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1), dict()),
    (dict(multi_query=False, parallel_attn=False, bias=True, activation="gelu_pytorch_tanh"),
     dict()),
], ids=["7b-mqa-parallel-tied", "40b-grouped-two-norms-chunked", "grouped-one-norm",
        "sequential-per-head-bias"])
def test_falcon_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(falcon_config(**overrides), str(tmp_path / "falcon"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


@pytest.mark.parametrize("overrides", [
    dict(), dict(new_decoder_architecture=True, num_kv_heads=2, bias=True)],
    ids=["7b-mqa", "40b-grouped-bias"])
def test_falcon_tensor_parallel(overrides, tmp_path):
    path = save_tiny(falcon_config(**overrides), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


def test_falcon_alibi_refused(tmp_path):
    assert_refused_at_load(falcon_config(alibi=True), "FalconForCausalLM", tmp_path,
                           "Falcon config alibi=True is not supported")
