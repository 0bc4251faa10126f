"""SmolLM3 (``SmolLM3ForCausalLM``) on tiny random models: NoPE layers (no rotary on the layers
``no_rope_layers`` marks 0) with and without sliding windows on them; greedy tokens and
per-token log-probabilities equal HF transformers' in float32, under chunked prefill and at
tensor_parallel_size=2 (gloo); a malformed ``no_rope_layers`` is refused naming it."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import (TINY, assert_parity, assert_refused_at_load, prompts,
                                         save_tiny)


def smollm3_config(**overrides):
    from transformers import SmolLM3Config

    return SmolLM3Config(**{**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                            **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(no_rope_layer_interval=2), dict()),  # layer 1 NoPE
    (dict(no_rope_layers=[0, 1], use_sliding_window=True, sliding_window=8,
          num_key_value_heads=1, tie_word_embeddings=True), dict(max_num_batched_tokens=8)),
], ids=["second-layer-nope", "first-layer-nope-windowed-mqa-tied-chunked"])
def test_smollm3_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(smollm3_config(**overrides), str(tmp_path / "smollm3"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# Slow lane (ci/matrix.yaml's cpu lane): NoPE layers shard as any llama layer; the llama decoder
# under TP is tests/distributed/test_parallel_parity.py's, in the default suite.
@pytest.mark.slow
def test_smollm3_tensor_parallel(tmp_path):
    path = save_tiny(smollm3_config(no_rope_layer_interval=2), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


def test_smollm3_no_rope_layers_length_refused(tmp_path):
    config = smollm3_config()
    config.no_rope_layers = [1, 1, 0]
    assert_refused_at_load(config, "SmolLM3ForCausalLM", tmp_path,
                           r"SmolLM3 config no_rope_layers=\[1, 1, 0\] is not supported")
