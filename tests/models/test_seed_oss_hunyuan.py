"""Seed-OSS (``SeedOssForCausalLM``) and Hunyuan dense (``HunYuanDenseV1ForCausalLM``) on tiny
random models: Seed-OSS's separate q/k/v and o_proj biases; Hunyuan's per-head q/k RMSNorm
after rotary and its NTK-alpha rope; greedy tokens and per-token log-probabilities equal HF
transformers' in float32, under chunked prefill too."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny

IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def seed_oss_config(**overrides):
    from transformers import SeedOssConfig

    return SeedOssConfig(**{**TINY, **IDS, "head_dim": 32, **overrides})


def hunyuan_config(**overrides):
    from transformers import HunYuanDenseV1Config

    return HunYuanDenseV1Config(**{**TINY, **IDS, "head_dim": 16, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict(max_num_batched_tokens=8)),  # q/k/v bias, none on o_proj
    (dict(attention_out_bias=True, mlp_bias=True, num_key_value_heads=1,
          tie_word_embeddings=True), dict()),
], ids=["qkv-bias-head-dim-32-chunked", "o-and-mlp-bias-mqa-tied"])
def test_seed_oss_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(seed_oss_config(**overrides), str(tmp_path / "seed"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict(max_num_batched_tokens=8)),
    (dict(attention_bias=True, tie_word_embeddings=True,
          rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0,
                           "factor": 1.0}), dict()),
], ids=["plain-chunked", "ntk-alpha-bias-tied"])
def test_hunyuan_dense_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(hunyuan_config(**overrides), str(tmp_path / "hunyuan"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# Slow lane (ci/matrix.yaml's cpu lane): each rank norms its own heads after rotary.
@pytest.mark.slow
def test_hunyuan_dense_tensor_parallel(tmp_path):
    path = save_tiny(hunyuan_config(attention_bias=True), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


def hunyuan_moe_config(**overrides):
    from transformers import HunYuanMoEV1Config

    return HunYuanMoEV1Config(**{**TINY, **IDS, "head_dim": 16, "intermediate_size": 32,
                                 "num_experts": 8, "moe_topk": 2, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict(max_num_batched_tokens=8)),
    (dict(attention_bias=True, moe_topk=[1, 3], tie_word_embeddings=True,
          rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0,
                           "factor": 1.0}), dict()),
], ids=["top-2-chunked", "per-layer-top-k-ntk-alpha-bias-tied"])
def test_hunyuan_moe_matches_hf(overrides, engine, tmp_path):
    from tests.models.test_deepseek import save_deepseek

    path = save_deepseek(hunyuan_moe_config(**overrides), str(tmp_path / "hunyuan-moe"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# Slow lane (ci/matrix.yaml's cpu lane): experts and the shared MLP split over the ranks, the
# float32 router replicated.
@pytest.mark.slow
def test_hunyuan_moe_tensor_parallel(tmp_path):
    from tests.models.test_deepseek import save_deepseek

    path = save_deepseek(hunyuan_moe_config(), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")
