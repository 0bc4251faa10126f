"""StableLM (``StableLmForCausalLM``) on tiny random models: LayerNorms with weight and bias,
q/k/v biases, partial rotary (a quarter of each head); greedy tokens and per-token
log-probabilities equal HF transformers' in float32, under chunked prefill and at
tensor_parallel_size=2 (gloo); the options not implemented are refused naming them."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny


def stablelm_config(**overrides):
    from transformers import StableLmConfig

    return StableLmConfig(**{**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                             **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(use_qkv_bias=True), dict()),
    (dict(num_key_value_heads=1, tie_word_embeddings=True,
          partial_rotary_factor=0.5), dict(max_num_batched_tokens=8)),
], ids=["qkv-bias", "mqa-tied-half-rotary-chunked"])
def test_stablelm_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(stablelm_config(**overrides), str(tmp_path / "stablelm"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


def test_stablelm_tensor_parallel(tmp_path):
    path = save_tiny(stablelm_config(use_qkv_bias=True), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


@pytest.mark.parametrize("name", ["qk_layernorm", "use_parallel_residual"])
def test_stablelm_unimplemented_option_refused(name, tmp_path):
    from tessellm import LLM

    config = stablelm_config(**{name: True})
    config.architectures = ["StableLmForCausalLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"StableLM config {name}=True .* is not supported"):
        LLM(str(tmp_path), load_format="dummy", dtype="float32")
