"""GPT-NeoX (``GPTNeoXForCausalLM``: Pythia) on tiny random models: q/k/v fused per head in
``query_key_value``, the parallel residual (two LayerNorms, one per sublayer) and the
sequential one, partial rotary, gelu, biases everywhere, the ``embed_out`` head and the causal
mask buffers old checkpoints carry; greedy tokens and per-token log-probabilities equal HF
transformers' in float32, under chunked prefill and at tensor_parallel_size=2 (gloo)."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, add_to_checkpoint, assert_parity, prompts, save_tiny


def neox_config(**overrides):
    from transformers import GPTNeoXConfig

    fields = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}  # no GQA in NeoX
    return GPTNeoXConfig(**{**fields, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                            **overrides})


def add_mask_buffers(path: str) -> None:
    """As Pythia's checkpoints: each layer's ``attention.bias`` (the causal mask) and
    ``attention.masked_bias`` saved beside the weights."""
    import torch

    add_to_checkpoint(path, {name: value for i in range(2) for name, value in (
        (f"gpt_neox.layers.{i}.attention.bias", torch.ones(1, 1, 128, 128).tril().bool()),
        (f"gpt_neox.layers.{i}.attention.masked_bias", torch.tensor(-1e9)))})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    (dict(use_parallel_residual=False, tie_word_embeddings=True, rotary_pct=0.5),
     dict(max_num_batched_tokens=8)),
    (dict(attention_bias=False, hidden_act="gelu_fast", rotary_pct=1.0,
          rotary_emb_base=500), dict()),
], ids=["pythia-like", "sequential-tied-half-rotary-chunked", "no-attention-bias-full-rotary"])
def test_gpt_neox_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(neox_config(**overrides), str(tmp_path / "neox"))
    add_mask_buffers(path)
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# The sequential block is DecoderLayer, under TP in tests/distributed/test_parallel_parity.py by
# default; the per-head q/k/v cut is in both cases: sequential runs in the slow lane.
@pytest.mark.parametrize("parallel", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["parallel", "sequential"])
def test_gpt_neox_tensor_parallel(parallel, tmp_path):
    """Each rank takes its heads' q, k and v out of the per-head fused rows."""
    path = save_tiny(neox_config(use_parallel_residual=parallel, attention_bias=parallel),
                     str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")
