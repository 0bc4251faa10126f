"""Greedy tokens equal HF transformers' in float32, through every scheduling path."""

from __future__ import annotations

import random

import pytest

from tessellm import LLM, SamplingParams
from tests.conftest import TINY_ARCHS, hf_greedy

MAX_NEW = 12


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(vocab) for _ in range(40)]  # two prompts share a 40-token prefix
    lengths = [1, 5, 17, 33, 64, 90, 9, 48]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    prompts[5] = shared + prompts[5][:20]
    prompts[7] = shared + prompts[7][:8]
    return prompts


ENGINE_VARIANTS = {
    "default": dict(),
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(num_kv_blocks=36, block_size=4),
}


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    cache = {}

    def get(arch):
        if arch not in cache:
            path = tiny_model_dir(arch)
            cache[arch] = (path, hf_greedy(path, _prompts(384), MAX_NEW))
        return cache[arch]

    return get


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_matches_hf(references, arch, variant):
    path, want = references(arch)
    llm = LLM(path, dtype="float32", **ENGINE_VARIANTS[variant])
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts(384)], params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == want
    core = llm.engine.core
    if variant == "preemption":
        assert core.scheduler.num_preemptions_total > 0, "the tiny cache should force preemption"
    if variant == "default":
        # Second pass: every prompt's full blocks now come from the prefix cache.
        again = llm.generate([{"prompt_token_ids": p} for p in _prompts(384)], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == want
        assert core.kv.stats.hits > 0 and any(o.num_cached_tokens > 0 for o in again)
    assert core.kv.num_free_blocks == core.kv.num_blocks  # everything freed at the end


def test_n_samples_share_prompt_blocks(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), dtype="float32")
    prompt = list(range(1, 70))
    params = SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert len(out.outputs) == 3 and [o.index for o in out.outputs] == [0, 1, 2]
    # Samples 2 and 3 reuse the 4 full 16-token blocks of the prompt that sample 1 computed.
    assert llm.engine.core.kv.stats.hits >= 2 * 64
