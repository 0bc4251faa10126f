"""GPT-BigCode (``GPTBigCodeForCausalLM``: StarCoder, SantaCoder) on tiny random models:
learned absolute position embeddings (no rotary), ``c_attn`` fused as ``[q | k | v]`` with one
KV head (``multi_query``) or per head without it, ``scale_attn_weights`` off, LayerNorms with
bias, the gelu MLP, tied embeddings and the mask buffers some checkpoints carry; greedy tokens
and per-token log-probabilities equal HF transformers' in float32, under chunked prefill and at
tensor_parallel_size=2 (gloo); cross-attention is refused naming it."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import (add_to_checkpoint, assert_parity, assert_refused_at_load,
                                         prompts, save_tiny)

TINY_GPT = dict(vocab_size=128, n_embd=64, n_inner=96, n_layer=2, n_head=4, n_positions=128,
                initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def bigcode_config(**overrides):
    from transformers import GPTBigCodeConfig

    return GPTBigCodeConfig(**{**TINY_GPT, "pad_token_id": 0, "bos_token_id": 1,
                               "eos_token_id": 2, **overrides})


def add_mask_buffers(path: str) -> None:
    import torch

    add_to_checkpoint(path, {name: value for i in range(2) for name, value in (
        (f"transformer.h.{i}.attn.bias", torch.ones(1, 1, 128, 128).tril().bool()),
        (f"transformer.h.{i}.attn.masked_bias", torch.tensor(-1e4)))})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    (dict(multi_query=False, tie_word_embeddings=False, activation_function="gelu"),
     dict(max_num_batched_tokens=8)),
    (dict(scale_attn_weights=False, n_inner=None), dict()),
], ids=["starcoder-mqa-tied", "per-head-qkv-untied-gelu-chunked", "unscaled-4x-inner"])
def test_gpt_bigcode_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(bigcode_config(**overrides), str(tmp_path / "bigcode"))
    add_mask_buffers(path)
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


@pytest.mark.parametrize("multi_query", [True, False], ids=["mqa", "per-head"])
def test_gpt_bigcode_tensor_parallel(multi_query, tmp_path):
    """The one KV head is replicated on both ranks (multi_query); position embeddings whole on
    each."""
    path = save_tiny(bigcode_config(multi_query=multi_query), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


def test_gpt_bigcode_cross_attention_refused(tmp_path):
    assert_refused_at_load(bigcode_config(add_cross_attention=True, multi_query=False),
                           "GPTBigCodeForCausalLM", tmp_path,
                           "GPT-BigCode config add_cross_attention=True is not supported")
