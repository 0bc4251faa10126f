"""InternLM3 (``InternLM3ForCausalLM``), which transformers 5 serves with its Llama model under
the checkpoint's own names, on tiny random models saved with InternLM3's config fields
(``qkv_bias``, ``bias``); greedy tokens and per-token log-probabilities equal HF
transformers' in float32, under chunked prefill and at tensor_parallel_size=2 (gloo)."""

from __future__ import annotations

import json
import os

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny


def save_internlm3(path: str, **overrides) -> str:
    from transformers import InternLM3Config

    save_tiny(InternLM3Config(**{**TINY, "pad_token_id": 0, "bos_token_id": 1,
                                 "eos_token_id": 2, **overrides}), path)
    file = os.path.join(path, "config.json")
    fields = json.load(open(file))
    fields["architectures"] = ["InternLM3ForCausalLM"]  # as InternLM3's own config.json
    with open(file, "w") as f:
        json.dump(fields, f)
    return path


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    (dict(qkv_bias=True, bias=True, num_key_value_heads=1, tie_word_embeddings=True),
     dict(max_num_batched_tokens=8)),
], ids=["internlm3-8b-like", "biases-mqa-tied-chunked"])
def test_internlm3_matches_hf(overrides, engine, tmp_path):
    path = save_internlm3(str(tmp_path / "internlm3"), **overrides)
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# Slow lane (ci/matrix.yaml's cpu lane): the llama decoder under TP with q/k/v and MLP biases is
# tests/models/test_config_variants.py::test_biases_under_tensor_parallelism's, in the default suite.
@pytest.mark.slow
def test_internlm3_tensor_parallel(tmp_path):
    path = save_internlm3(str(tmp_path / "tp"), qkv_bias=True, bias=True)
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")
