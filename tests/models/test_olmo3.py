"""OLMo 3 (``Olmo3ForCausalLM``) on tiny random models: OLMo 2's layers with sliding-window
layers (window 8) interleaved with full-attention ones, each layer type with its own rope
(yarn on the full-attention layers); greedy tokens and per-token log-probabilities equal HF
transformers' in float32 with prompts and decoding past the window, under chunked prefill
smaller than it, and at tensor_parallel_size=2 (gloo)."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny

ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 50000.0,
                           "original_max_position_embeddings": 32}}


def olmo3_config(**overrides):
    from transformers import Olmo3Config

    return Olmo3Config(**{**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                          "sliding_window": 8, "rope_parameters": ROPE,
                          "layer_types": ["sliding_attention", "full_attention"], **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict(max_num_batched_tokens=8)),
    (dict(num_key_value_heads=1, head_dim=32, tie_word_embeddings=True), dict()),
], ids=["chunked", "mqa-head-dim-32-tied"])
def test_olmo3_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(olmo3_config(**overrides), str(tmp_path / "olmo3"))
    assert_parity(path, prompts((5, 40)), max_new=16, **engine)


# Slow lane (ci/matrix.yaml's cpu lane): OLMo 2's layers under TP are test_olmo2.py's, in the
# default suite; OLMo 3 adds windows and per-layer rope, which do not shard.
@pytest.mark.slow
def test_olmo3_tensor_parallel(tmp_path):
    path = save_tiny(olmo3_config(), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")
