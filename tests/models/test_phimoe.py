"""Phi-3.5-MoE (``PhimoeForCausalLM``) on tiny random models (4 experts): sparsemixer top-2
routing, LayerNorms with biases, q/k/v/o and LM-head biases, LongRoPE with its short/long
mscale. Greedy tokens and per-token log-probabilities equal HF transformers' in float32, with
several requests at once, under chunked prefill and at tensor_parallel_size=2."""

from __future__ import annotations

import pytest
import torch

from tests.models.variant_parity import (TINY, assert_parity, assert_refused_at_load, prompts,
                                         save_tiny)

# 8 rotary frequencies (head_dim 16); prompts and decoding stay below the original length (64),
# where HF and we both use the short factors and short_mscale.
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
            "long_factor": [1.0, 1.5, 2.2, 3.0, 4.1, 5.5, 7.2, 9.0],
            "short_mscale": 1.2, "long_mscale": 1.35, "original_max_position_embeddings": 64}


def phimoe_config(**overrides):
    from transformers import PhimoeConfig

    return PhimoeConfig(**{**TINY, "intermediate_size": 32, "num_local_experts": 4,
                           "num_experts_per_tok": 2, "attention_bias": True,
                           "lm_head_bias": True, "rope_parameters": LONGROPE, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    # a wide jitter band: the second expert's weight is a softmax over several experts
    (dict(router_jitter_noise=0.4, sliding_window=8), dict(max_num_batched_tokens=8)),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_bias=False,
          lm_head_bias=False, num_key_value_heads=1), dict()),
], ids=["longrope-biases", "wide-jitter-window-chunked", "plain-rope-mqa-no-bias"])
def test_phimoe_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(phimoe_config(**overrides), str(tmp_path / "phimoe"))
    assert_parity(path, prompts((5, 30, 17, 44)), max_new=16, **engine)


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2),
                                      dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_phimoe_parallel(parallel, tmp_path):
    """TP: heads and every expert's intermediate rows split over two ranks (gloo), the biased
    o_proj summing itself. PP: a layer a stage, the LM head and its bias on the second."""
    path = save_tiny(phimoe_config(router_jitter_noise=0.4), str(tmp_path / "par"))
    assert_parity(path, prompts((5, 30)), max_new=8, device="cpu", **parallel)


def test_sparsemixer_matches_hf():
    """The router alone, on ties and near-ties too: HF's ``sparsemixer`` at inference."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from tessellm.models.phimoe import sparsemixer_top2

    torch.manual_seed(0)
    logits = torch.randn(64, 8) * 2
    logits[:4, :3] = 1.5  # a three-way tie at the top
    logits[4:8] = logits[4:8, :1] + torch.rand(4, 8) * 1e-2  # everything within the band
    logits[8:12] = -logits[8:12].abs()  # all negative
    for eps in (0.01, 0.3):
        want_w, want_ids = sparsemixer(logits, jitter_eps=eps, training=False)
        got_w, got_ids = sparsemixer_top2(logits, eps)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w, atol=0, rtol=0)


@pytest.mark.parametrize("overrides, match", [
    (dict(num_experts_per_tok=1), "num_experts_per_tok=1"),
    (dict(num_local_experts=1, num_experts_per_tok=2), "num_local_experts=1"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
], ids=["top1", "one-expert", "gelu"])
def test_phimoe_unsupported_config_refused(overrides, match, tmp_path):
    assert_refused_at_load(phimoe_config(**overrides), "PhimoeForCausalLM", tmp_path, match)


def test_phimoe_block_fp8_checkpoint(tmp_path_factory):
    """A block-wise fp8 checkpoint (experts and attention linears fp8 with 128x128 scales, the
    router dense) serves the greedy tokens of its dequantized model, ours and HF's."""
    from tests.quantization.block_fp8_checkpoint import (assert_serves_dequantized,
                                                         checkpoint_maker)

    config = phimoe_config(hidden_size=128, intermediate_size=128, max_position_embeddings=256,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                           initializer_range=0.02)
    make = checkpoint_maker(tmp_path_factory.mktemp("phimoe-fp8"), {"phimoe": config}, seed=3)
    assert_serves_dequantized(*make("phimoe"), prompts((6, 30, 3)), 12)
