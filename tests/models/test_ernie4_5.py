"""ERNIE 4.5 dense (``Ernie4_5ForCausalLM``) and MoE (``Ernie4_5_MoeForCausalLM``) on tiny
random models: interleaved rotary on the NeoX kernels, ``use_bias`` everywhere, and the MoE's
softmax router with its selection bias, shared experts and dense layers outside
``moe_layer_start_index..moe_layer_end_index``; greedy tokens and per-token log-probabilities
equal HF transformers' in float32, under chunked prefill too."""

from __future__ import annotations

import pytest

from tests.models.test_deepseek import save_deepseek
from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny

ERNIE = {**TINY, "head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def ernie4_5_config(**overrides):
    from transformers import Ernie4_5Config

    return Ernie4_5Config(**{**ERNIE, **overrides})


def ernie4_5_moe_config(**overrides):
    from transformers import Ernie4_5_MoeConfig

    return Ernie4_5_MoeConfig(**{**ERNIE, "num_hidden_layers": 3, "moe_num_experts": 8,
                                 "moe_k": 2, "moe_intermediate_size": 32,
                                 "moe_num_shared_experts": 1, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict(max_num_batched_tokens=8)),
    (dict(use_bias=True, num_key_value_heads=1, tie_word_embeddings=True), dict()),
], ids=["plain-chunked", "bias-mqa-tied"])
def test_ernie4_5_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(ernie4_5_config(**overrides), str(tmp_path / "ernie"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict(max_num_batched_tokens=8)),  # layer 0 dense, layers 1-2 MoE
    (dict(use_bias=True, moe_num_shared_experts=2, moe_layer_start_index=0,
          moe_layer_interval=2, tie_word_embeddings=False), dict()),  # layer 1 MoE only
], ids=["plain-chunked", "bias-2-shared-every-2nd-untied"])
def test_ernie4_5_moe_matches_hf(overrides, engine, tmp_path):
    path = save_deepseek(ernie4_5_moe_config(**overrides), str(tmp_path / "ernie-moe"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# Slow lane (ci/matrix.yaml's cpu lane): experts under TP are tests/distributed/test_moe_parallel.py's.
@pytest.mark.slow
@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2),
                                      dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_ernie4_5_moe_parallel_with_bias(parallel, tmp_path):
    """``use_bias``. TP: the shared experts' down_proj sums its own output (its bias added
    once), so the routed experts' partial sums are summed in the MoE block too, before they
    join it. PP: the LM head and its bias on the last stage only."""
    path = save_deepseek(ernie4_5_moe_config(use_bias=True), str(tmp_path / "par"))
    assert_parity(path, prompts((5, 20)), max_new=8, device="cpu", **parallel)
