"""GLM-4 (``GlmForCausalLM``) and GLM-4-0414 (``Glm4ForCausalLM``) on tiny random models: the
checkpoint's fused gate_up_proj, q/k/v biases, rotary on interleaved pairs of half of each
head, and (0414) the norms after each sublayer; greedy tokens and per-token log-probabilities
equal HF transformers' in float32, under chunked prefill and at tensor_parallel_size=2
(gloo)."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny


def glm_config(version: str, **overrides):
    from transformers import Glm4Config, GlmConfig

    config_class = Glm4Config if version == "glm4" else GlmConfig
    return config_class(**{**TINY, "head_dim": 16, "pad_token_id": 0, "bos_token_id": 1,
                           "eos_token_id": 2, **overrides})


@pytest.mark.parametrize("version", ["glm", "glm4"])
@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    (dict(attention_bias=False, num_key_value_heads=1, tie_word_embeddings=True,
          head_dim=32), dict(max_num_batched_tokens=8)),
], ids=["glm-4-9b-like", "no-bias-mqa-tied-head-dim-32-chunked"])
def test_glm_matches_hf(version, overrides, engine, tmp_path):
    path = save_tiny(glm_config(version, **overrides), str(tmp_path / version))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# glm4 has glm's loading (fused gate_up, q/k reordering) plus the sandwich norms: glm alone runs
# in the slow lane (ci/matrix.yaml's cpu lane).
@pytest.mark.parametrize("version", [pytest.param("glm", marks=pytest.mark.slow), "glm4"])
def test_glm_tensor_parallel(version, tmp_path):
    path = save_tiny(glm_config(version), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")
