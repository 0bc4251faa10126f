"""Cohere (``CohereForCausalLM``) on tiny random models: the parallel attention + MLP block on
one weighted LayerNorm, interleaved (GPT-J) rotary served by the NeoX kernels through a
per-head reordering of q and k, per-head q/k LayerNorm (``use_qk_norm``) and ``logit_scale``;
greedy tokens and per-token log-probabilities equal HF transformers' in float32, under chunked
prefill and at tensor_parallel_size=2 (gloo)."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny


def cohere_config(**overrides):
    from transformers import CohereConfig

    return CohereConfig(**{**TINY, "logit_scale": 0.5, "pad_token_id": 0, "bos_token_id": 1,
                           "eos_token_id": 2, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    (dict(use_qk_norm=True, num_key_value_heads=1, tie_word_embeddings=True),
     dict(max_num_batched_tokens=8)),
    (dict(attention_bias=True, head_dim=32, logit_scale=1.0), dict()),
], ids=["plain", "qk-norm-mqa-tied-chunked", "bias-head-dim-32-scale-1"])
def test_cohere_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(cohere_config(**overrides), str(tmp_path / "cohere"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# bias: a parallel block whose biased projections sum themselves, test_phi.py's TP case in the
# default suite; it runs in the slow lane (ci/matrix.yaml's cpu lane).
@pytest.mark.parametrize("overrides", [dict(use_qk_norm=True),
                                       pytest.param(dict(attention_bias=True),
                                                    marks=pytest.mark.slow)],
                         ids=["qk-norm", "bias"])
def test_cohere_tensor_parallel(overrides, tmp_path):
    """Each rank norms its own heads with its rows of the per-head weights; the parallel
    block's two partial outputs are summed once (by the next norm, or by o_proj and down_proj
    themselves with attention_bias)."""
    path = save_tiny(cohere_config(**overrides), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


def test_cohere_logit_scale_null_refused(tmp_path):
    """HF's CohereForCausalLM multiplies by logit_scale unconditionally (null fails there)."""
    from tessellm import LLM

    config = cohere_config(logit_scale=None)
    config.architectures = ["CohereForCausalLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Cohere config logit_scale=None is not supported"):
        LLM(str(tmp_path), load_format="dummy", dtype="float32")


def test_cohere_qk_norm_weights_without_use_qk_norm_refused(tmp_path):
    import json

    from tessellm import LLM

    path = save_tiny(cohere_config(use_qk_norm=True), str(tmp_path / "cohere"))
    fields = json.loads((tmp_path / "cohere" / "config.json").read_text())
    (tmp_path / "cohere" / "config.json").write_text(json.dumps({**fields, "use_qk_norm": False}))
    with pytest.raises(ValueError, match="[qk]_norm.weight' has no place .*use_qk_norm"):
        LLM(path, dtype="float32")
