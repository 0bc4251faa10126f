"""Speculative decoding under tensor parallelism on the CPU (``mp`` executor, 2 ranks, gloo):
every rank verifies and proposes identically, rank 0's drafts go to the scheduler, and greedy
tokens equal one process without speculation, for n-gram (async scheduling on: steps ahead
with reserved drafts) and a draft model sharded with the target's group."""

from __future__ import annotations

import pytest

from tessellm import LLM

from parity_helpers import greedy_tokens, one_process_tokens

PROMPTS = [[5, 17, 42, 99, 3, 250, 5, 17, 42], [7, 7, 7], list(range(40, 80)), [300, 12, 300, 12]]


def _tokens(llm) -> list[list[int]]:
    return greedy_tokens(llm, PROMPTS)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    path = tiny_model_dir("llama-sharp")
    return path, one_process_tokens(path, PROMPTS)


@pytest.mark.parametrize("method,async_scheduling", [
    ("ngram", True),
    pytest.param("draft_model", False, marks=pytest.mark.slow),
])
def test_tp2_speculation_matches_one_process(reference, method, async_scheduling):
    path, expected = reference
    config = {"method": method, "num_speculative_tokens": 3}
    if method == "ngram":
        config.update(prompt_lookup_min=1, prompt_lookup_max=3)
    else:
        config["model"] = path  # the target drafting for itself: every draft accepted
    with LLM(path, device="cpu", num_kv_blocks=64, seed=0, tensor_parallel_size=2,
             max_num_batched_tokens=24, speculative_config=config,
             async_scheduling=async_scheduling) as llm:
        core = llm.engine.core
        assert len(core.executor.worker_info) == 2
        assert _tokens(llm) == expected
        stats = core.scheduler.spec_stats
        assert stats.num_drafts > 0  # n-gram on this random model: drafts made, all rejected
        if method == "draft_model":
            assert stats.num_accepted_tokens == stats.num_draft_tokens
        assert core.kv.num_free_blocks == core.kv.num_blocks
