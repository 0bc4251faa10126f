"""End to end on the backend: greedy tokens equal the cpu backend's on a tiny random Llama
(float32), through prefill, chunked prefill, prefix-cache hits and batched decode."""

from __future__ import annotations

import pytest

from tessellm.testing.harness import greedy_tokens

PROMPTS = [[1, 17, 33, 5], [2] + list(range(40, 75)), [3, 9] * 11, list(range(100, 120)),
           list(range(100, 120)) + [7, 8, 9]]  # the last shares a 16-token block with the one before
ENGINE = dict(dtype="float32", block_size=16, num_kv_blocks=48, max_model_len=128,
              max_num_seqs=4, max_num_batched_tokens=32, seed=0)


@pytest.fixture(scope="module")
def cpu_tokens(tiny_llama_dir):
    from tessellm import LLM

    return greedy_tokens(LLM(tiny_llama_dir, device="cpu", **ENGINE), PROMPTS, 8)


def test_greedy_parity_with_cpu(target, tiny_llama_dir, cpu_tokens):
    from tessellm import LLM

    # Emulated (device absent): the whole engine on this backend's kernels and host tensors.
    llm = LLM(tiny_llama_dir, device=target.name, emulate=target.emulated, **ENGINE)
    assert llm.engine.core.backend.name == target.name
    assert llm.engine.core.backend.emulated == target.emulated
    assert greedy_tokens(llm, PROMPTS, 8) == cpu_tokens


def test_cpu_matches_hf_transformers(target, tiny_llama_dir, cpu_tokens):
    """The oracle itself: the cpu backend's tokens equal HF transformers' greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from tessellm.loader.transformers_classes import dtype_kwargs

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, **dtype_kwargs(torch.float32))
    hf.generation_config.eos_token_id = None  # as our ignore_eos: EOS may be chosen, never stops
    for prompt, got in zip(PROMPTS[:2], cpu_tokens[:2]):
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=8,
                          do_sample=False, pad_token_id=0)
        assert ids[0, len(prompt):].tolist() == got
