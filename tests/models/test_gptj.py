"""GPT-J (``GPTJForCausalLM``) on tiny random models: the parallel block on one LayerNorm with
bias, rotary on interleaved pairs of part of each head (``rotary_dim``) or all of it, no
attention biases, MLP and LM-head biases, and the buffers old checkpoints carry; greedy tokens
and per-token log-probabilities equal HF transformers' in float32, under chunked prefill and at
tensor_parallel_size=2 (gloo)."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import add_to_checkpoint, assert_parity, prompts, save_tiny

TINY_GPTJ = dict(vocab_size=128, n_embd=64, n_inner=96, n_layer=2, n_head=4, n_positions=128,
                 rotary_dim=8, initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0, tie_word_embeddings=False)


def gptj_config(**overrides):
    from transformers import GPTJConfig

    return GPTJConfig(**{**TINY_GPTJ, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                         **overrides})


def add_buffers(path: str) -> None:
    """As GPT-J-6B's checkpoint: each layer's causal mask and masked_bias."""
    import torch

    add_to_checkpoint(path, {name: value for i in range(2) for name, value in (
        (f"transformer.h.{i}.attn.bias", torch.ones(1, 1, 128, 128).tril().bool()),
        (f"transformer.h.{i}.attn.masked_bias", torch.tensor(-1e9)))})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    (dict(rotary_dim=16, activation_function="gelu"), dict(max_num_batched_tokens=8)),
], ids=["gpt-j-6b-like-half-rotary", "full-rotary-gelu-chunked"])
def test_gptj_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(gptj_config(**overrides), str(tmp_path / "gptj"))
    add_buffers(path)
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# Slow lane (ci/matrix.yaml's cpu lane): a parallel block summed by the next norm is
# test_cohere.py's TP case and an LM head bias under TP test_phi.py's, in the default suite.
@pytest.mark.slow
def test_gptj_tensor_parallel(tmp_path):
    path = save_tiny(gptj_config(), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")
