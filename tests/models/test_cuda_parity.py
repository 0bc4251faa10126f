"""On a CUDA GPU: greedy tokens of a tiny Llama equal HF's in float32, graphs on and off."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.conftest import hf_greedy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [[(7 * i + j) % 384 for j in range(n)] for i, n in enumerate([1, 5, 17, 33, 64, 90, 9, 48])]


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_fp32_greedy_matches_hf(tiny_model_dir, enforce_eager):
    path = tiny_model_dir("llama-sharp")
    want = hf_greedy(path, PROMPTS, 12, device="cuda")
    llm = LLM(path, device="cuda", dtype="float32", enforce_eager=enforce_eager)
    assert (llm.engine.core.runner.graph_runner is None) == enforce_eager
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want


def test_bf16_agrees_on_first_tokens(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    want = hf_greedy(path, PROMPTS, 4, device="cuda", dtype=torch.bfloat16)
    llm = LLM(path, device="cuda", dtype="bfloat16")
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    first = [o.outputs[0].token_ids[0] for o in outs]
    agree = sum(f == w[0] for f, w in zip(first, want))
    assert agree >= 6, f"bf16 first tokens agree on {agree}/8 prompts"
