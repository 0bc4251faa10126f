"""Speculative decoding up to the last position of the context (prompt + max_tokens ==
max_model_len): a draft model keeps KV slots past a request's tokens for its own guesses, and
none may lie past the context (the block tables hold max_model_len tokens). Greedy tokens
equal the run without speculation, and every block comes back."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams

MAX_LEN = 64
ENGINE = dict(dtype="float32", block_size=4, num_kv_blocks=96, max_model_len=MAX_LEN, seed=0)
PROMPT_LENS = [50, 58, 61, 62, 63]


def _generate(llm: LLM) -> list[list[int]]:
    base = [5, 6, 7, 8, 9, 10]
    prompts = [{"prompt_token_ids": (base * 20)[:n]} for n in PROMPT_LENS]
    params = [SamplingParams(max_tokens=MAX_LEN - n, temperature=0, ignore_eos=True) for n in PROMPT_LENS]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def want(model):
    with LLM(model, **ENGINE) as llm:
        return _generate(llm)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_draft_model_to_the_last_position(model, want, async_scheduling):
    spec = {"method": "draft_model", "model": model, "num_speculative_tokens": 4}
    with LLM(model, **ENGINE, speculative_config=spec, async_scheduling=async_scheduling) as llm:
        assert _generate(llm) == want
        assert llm.engine.core.scheduler.spec_stats.num_accepted_tokens > 0  # a target drafting for itself
