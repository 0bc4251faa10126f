"""The mixed batch the engine-level speculation tests share (test_spec_engine.py,
test_spec_async.py; fixtures ``model`` and ``want`` in conftest.py): prompts of several lengths
(one chunked under a 32-token budget), their output lengths, an n-gram config, the engine's
settings, and greedy generation."""

from __future__ import annotations

from tessellm import SamplingParams

PROMPTS = [[5, 17, 42, 99, 3, 250, 11], [7, 7, 7, 12, 30], list(range(10, 60)), [1, 2, 3, 1, 2, 3, 1, 2],
           [300, 301, 302, 303, 300, 301]]
MAX_TOKENS = [16, 12, 16, 10, 14]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
ENGINE = dict(device="cpu", dtype="float32", seed=0, block_size=4, num_kv_blocks=256)


def greedy_params() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]


def generate(llm, prompts=PROMPTS) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy_params(), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]
