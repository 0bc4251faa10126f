"""Phi-3 on a tiny random model: fused qkv / gate_up checkpoint tensors and LongRoPE scaling;
greedy tokens equal HF transformers' in float32 (sequences below original_max_position_embeddings,
where both use the short factors)."""

from __future__ import annotations

import random

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.conftest import hf_greedy

MAX_NEW = 64


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Phi3Config

    config = Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        original_max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                        bos_token_id=2, tie_word_embeddings=False,
                        rope_scaling={"type": "longrope",
                                      "short_factor": [1.0 + 0.3 * i for i in range(8)],
                                      "long_factor": [2.0 + 0.5 * i for i in range(8)]})
    torch.manual_seed(17)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = str(tmp_path_factory.mktemp("tiny-phi3") / "phi3")
    model.save_pretrained(path)
    return path


def _prompts():
    rng = random.Random(3)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in (4, 30, 77)]


def test_phi3_greedy_matches_hf(phi3_dir):
    from safetensors import safe_open

    with safe_open(f"{phi3_dir}/model.safetensors", "pt") as f:
        assert any(k.endswith("qkv_proj.weight") for k in f.keys())  # the fused layout
    want = hf_greedy(phi3_dir, _prompts(), MAX_NEW)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    llm = LLM(phi3_dir, dtype="float32")
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want


def test_longrope_cache_switches_factor_at_original_length():
    from tessellm.backends.reference.ops import ReferenceOps
    from tessellm.layers.rotary import RotaryEmbedding

    scaling = {"rope_type": "longrope", "original_max_position_embeddings": 4,
               "short_factor": [1.0, 1.0], "long_factor": [2.0, 4.0]}
    rot = RotaryEmbedding(4, 8, 10000.0, scaling, ReferenceOps())
    scale = (1 + torch.log(torch.tensor(2.0)) / torch.log(torch.tensor(4.0))).sqrt()
    inv_short = 1.0 / (10000.0 ** (torch.arange(0, 4, 2).float() / 4))
    torch.testing.assert_close(rot.cos_sin_cache[3, :2], (3 * inv_short).cos() * scale)
    inv_long = inv_short / torch.tensor([2.0, 4.0])
    torch.testing.assert_close(rot.cos_sin_cache[5, 2:], (5 * inv_long).sin() * scale)
