"""OLMo (``OlmoForCausalLM``) on tiny random models: LayerNorms without weight or bias, and
``clip_qkv`` set low enough to clamp many q/k/v values; greedy tokens and per-token
log-probabilities equal HF transformers' in float32, under chunked prefill and at
tensor_parallel_size=2 (gloo); a clip_qkv we cannot use is refused naming it."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny


def olmo_config(**overrides):
    from transformers import OlmoConfig

    return OlmoConfig(**{**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                         **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    (dict(clip_qkv=1.0, num_key_value_heads=1), dict(max_num_batched_tokens=8)),
    (dict(clip_qkv=2.0, attention_bias=True, tie_word_embeddings=True), dict()),
], ids=["plain", "clip-mqa-chunked", "clip-bias-tied"])
def test_olmo_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(olmo_config(**overrides), str(tmp_path / "olmo"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


def test_olmo_tensor_parallel(tmp_path):
    """The layer norms sum the partial o_proj / down_proj outputs over the ranks first."""
    path = save_tiny(olmo_config(clip_qkv=1.0), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


def test_olmo_bad_clip_qkv_refused(tmp_path):
    from tessellm import LLM

    config = olmo_config(clip_qkv=-1.0)
    config.architectures = ["OlmoForCausalLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"OLMo config clip_qkv=-1.0 is not supported"):
        LLM(str(tmp_path), load_format="dummy", dtype="float32")
