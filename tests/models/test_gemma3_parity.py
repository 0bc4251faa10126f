"""Gemma 3 (text) on a tiny random model: greedy tokens equal HF transformers' in float32, with
prompts and generations that cross the sliding window of its local layers."""

from __future__ import annotations

import random

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.conftest import hf_greedy

MAX_NEW = 64


def gemma3_config(**overrides):
    from transformers import Gemma3TextConfig

    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  query_pre_attn_scalar=32, max_position_embeddings=512, sliding_window=16,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                      "rope_theta": 1000000.0}},
                  initializer_range=0.1)
    kwargs.update(overrides)
    return Gemma3TextConfig(**kwargs)


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(99)
    model = AutoModelForCausalLM.from_config(gemma3_config(), dtype=torch.float32)
    with torch.no_grad():  # HF initializes the (1 + w) norms at w = 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    path = str(tmp_path_factory.mktemp("tiny-gemma3") / "gemma3")
    model.save_pretrained(path)
    return path


def _prompts():
    rng = random.Random(5)
    return [[rng.randrange(256) for _ in range(n)] for n in (5, 23, 60)]


def test_gemma3_greedy_matches_hf(gemma3_dir):
    want = hf_greedy(gemma3_dir, _prompts(), MAX_NEW)
    llm = LLM(gemma3_dir, dtype="float32", max_num_batched_tokens=32)  # chunked prefill too
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
