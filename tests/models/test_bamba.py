"""Bamba (``BambaForCausalLM``) on a tiny random model: Mamba2 layers around an attention layer
with partial rotary (``partial_rotary_factor`` 0.5), the renamed MLP (``feed_forward``,
``pre_ff_layernorm``). Greedy tokens and per-token log-probabilities equal HF transformers' in
float32 for concurrent requests of different lengths, with and without chunked prefill."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny


def bamba_config(**overrides):
    from transformers import BambaConfig

    return BambaConfig(**{**TINY, "num_hidden_layers": 3, "attn_layer_indices": [1],
                          "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 2,
                          "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2,
                          "mamba_chunk_size": 8, **overrides})


@pytest.mark.parametrize("engine", [dict(), dict(max_num_batched_tokens=8)],
                         ids=["whole-prompts", "chunked-prefill"])
def test_bamba_matches_hf(engine, tmp_path):
    path = save_tiny(bamba_config(), str(tmp_path / "bamba"))
    assert_parity(path, prompts((1, 6, 23, 30)), max_new=10, **engine)
