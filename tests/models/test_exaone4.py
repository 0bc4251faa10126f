"""EXAONE 4.0 (``Exaone4ForCausalLM``) on tiny random models: OLMo 2's post-sublayer norms,
per-head q/k RMSNorm, and sliding layers with rotary interleaved with global NoPE ones (or
every layer global and rotated without ``sliding_window``); greedy tokens and per-token
log-probabilities equal HF transformers' in float32, under chunked prefill and at
tensor_parallel_size=2 (gloo)."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny


def exaone4_config(**overrides):
    from transformers import Exaone4Config

    return Exaone4Config(**{**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                            **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(sliding_window=8, sliding_window_pattern=2), dict(max_num_batched_tokens=8)),
    # as EXAONE 4.0 1.2B: layer_types listed (HF divides by a zero pattern without them)
    (dict(sliding_window=None, layer_types=["full_attention"] * 2, num_key_value_heads=1,
          tie_word_embeddings=True), dict()),
], ids=["window-8-local-global-chunked", "all-global-mqa-tied"])
def test_exaone4_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(exaone4_config(**overrides), str(tmp_path / "exaone4"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# Slow lane (ci/matrix.yaml's cpu lane): OLMo 2's post-norm layer under TP is test_olmo2.py's and
# per-head q/k norms under TP are qwen3's (tests/distributed/test_parallel_parity.py), by default.
@pytest.mark.slow
def test_exaone4_tensor_parallel(tmp_path):
    """Per-head q/k norms need nothing from the other rank; o_proj and down_proj sum their
    outputs before the post norms."""
    path = save_tiny(exaone4_config(sliding_window=8, sliding_window_pattern=2),
                     str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")
