"""Checkpoint loading: sharded safetensors with an index, dummy weights, mismatches."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.conftest import hf_greedy

PROMPTS = [[5, 9, 200, 31], list(range(40, 90))]


def test_sharded_safetensors_with_index(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2"), dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.exists(tmp_path / "model.safetensors.index.json")
    want = hf_greedy(str(tmp_path), PROMPTS, 8)
    llm = LLM(str(tmp_path), dtype="float32")
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want


def test_dummy_weights_need_only_config(tiny_model_dir, tmp_path):
    with open(os.path.join(tiny_model_dir("qwen3"), "config.json")) as f:
        config = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    llm = LLM(str(tmp_path), load_format="dummy")
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].text == ""  # no tokenizer
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text needs a tokenizer", use_tqdm=False)


def test_checkpoint_not_matching_config_is_explained(tiny_model_dir, tmp_path):
    with open(os.path.join(tiny_model_dir("llama"), "config.json")) as f:
        config = json.load(f)
    config["intermediate_size"] = 256  # the weights say 128
    for name in os.listdir(tiny_model_dir("llama")):
        if name.endswith(".safetensors"):
            os.symlink(os.path.join(tiny_model_dir("llama"), name), tmp_path / name)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="shape .* expected .*config does not match"):
        LLM(str(tmp_path), dtype="float32")
