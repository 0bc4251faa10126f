"""Speculative decoding up to the last position of the context (prompt + max_tokens ==
max_model_len): a draft model keeps KV slots past a request's tokens for its own guesses, and
none may lie past the context (the block tables hold max_model_len tokens). Greedy tokens
equal the run without speculation, and every block comes back."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.spec_decode.test_draft_proposers import TARGET, _save_head, _save_llama

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
def models(tmp_path_factory):
    """A tiny target (4 layers), and an EAGLE head for it (random: few drafts accepted)."""
    root = tmp_path_factory.mktemp("context-end")
    return _save_llama(str(root / "target"), TARGET, 1), _save_head(str(root / "eagle"), "eagle", TARGET, 3)


@pytest.fixture(scope="module")
def model(models):
    return models[0]


@pytest.fixture(scope="module")
def want(model):
    with LLM(model, **ENGINE) as llm:
        return _generate(llm)


@pytest.mark.parametrize("method, async_scheduling", [("draft_model", False), ("draft_model", True),
                                                      ("eagle", False)])
def test_drafter_to_the_last_position(models, want, method, async_scheduling):
    target, head = models
    spec = {"method": method, "model": target if method == "draft_model" else head,
            "num_speculative_tokens": 4}
    with LLM(target, **ENGINE, speculative_config=spec, async_scheduling=async_scheduling) as llm:
        assert _generate(llm) == want
        assert llm.engine.core.scheduler.spec_stats.num_draft_tokens > 0
