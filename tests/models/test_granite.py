"""Granite (``GraniteForCausalLM``) on tiny random models: greedy tokens and per-token
log-probabilities equal HF transformers' in float32 with every Granite scalar away from 1
(embedding, attention and residual multipliers, logits scaling); under chunked prefill and
at tensor_parallel_size=2; a config scalar we cannot use is refused naming it."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny

# Granite 3.x-like proportions: attention_multiplier replaces head_dim ** -0.5 (0.25 here)
SCALARS = dict(embedding_multiplier=3.0, attention_multiplier=0.4, residual_multiplier=0.5,
               logits_scaling=1.5)


def granite_config(**overrides):
    from transformers import GraniteConfig

    return GraniteConfig(**{**TINY, **SCALARS, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    # MQA, tied embeddings (as Granite 3 ships), chunked prefill
    (dict(num_key_value_heads=1, tie_word_embeddings=True), dict(max_num_batched_tokens=8)),
    (dict(attention_bias=True, mlp_bias=True), dict()),
], ids=["plain", "mqa-tied-chunked", "biases"])
def test_granite_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(granite_config(**overrides), str(tmp_path / "granite"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


def test_granite_tensor_parallel(tmp_path):
    """tensor_parallel_size=2 (gloo workers): the residual multiplier scales each rank's
    partial o_proj / down_proj output before the norm sums them; with biases (summed in the
    projection) as well."""
    path = save_tiny(granite_config(attention_bias=True, mlp_bias=True), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


@pytest.mark.parametrize("name, value", [("logits_scaling", 0.0), ("residual_multiplier", float("inf"))])
def test_granite_bad_scalar_refused(name, value, tmp_path):
    import json

    from tessellm import LLM

    config = granite_config()
    config.architectures = ["GraniteForCausalLM"]
    config.save_pretrained(tmp_path)
    fields = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**fields, name: value}))
    with pytest.raises(ValueError, match=f"Granite config {name}={value!r} is not supported"):
        LLM(str(tmp_path), load_format="dummy", dtype="float32")
