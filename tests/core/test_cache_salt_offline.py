"""``cache_salt`` in an offline prompt dict (vLLM's TextPrompt / TokensPrompt field): a
request reuses cached prompt blocks only of requests with the same salt."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams

PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)


def test_salt_isolates_prefix_cache_offline():
    params = SamplingParams(temperature=0, max_tokens=1)
    with LLM(max_model_len=256, num_kv_blocks=64, block_size=16) as llm:
        def cached(**salt) -> int:
            return llm.generate({"prompt": PROMPT, **salt}, params, use_tqdm=False)[0].num_cached_tokens

        assert cached(cache_salt="a") == 0
        assert cached(cache_salt="b") == 0 and cached() == 0
        assert cached(cache_salt="a") >= 48 and cached() >= 48
        with pytest.raises(ValueError, match="cache_salt"):
            cached(cache_salt="")
