"""The bundled SmolLM2-135M-Instruct (GGUF, float32 on the cpu backend): greedy tokens with
n-gram drafts equal those without, on copy-heavy prompts where the drafts are mostly right."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams

PASSAGE = ("The river rose slowly through the night, and by morning the lower fields were under "
           "a sheet of brown water. Farmers gathered at the bridge to watch the current.")
PROMPTS = [f"Repeat this passage exactly:\n\n{PASSAGE}\n\nRepeated:\n",
           "1, 2, 3, 4, 5, 6, 7, 8,", "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n"]


@pytest.fixture(scope="module")
def llm():
    llm = LLM(dtype="float32", max_model_len=512, seed=0,
              speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    yield llm
    llm.shutdown()


@pytest.mark.slow  # about 90 s of CPU on this machine (two runs of a 135M model in float32)
def test_ngram_greedy_equals_plain_on_bundled_model(llm):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    spec = llm.engine.core.runner.spec
    spec.config.disable_by_batch_size = 1  # the load policy turns drafting off: plain decoding
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert llm.engine.core.scheduler.spec_stats.num_drafts == 0
    spec.config.disable_by_batch_size = 0  # drafting on at every batch size
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert got == want
    stats = llm.engine.core.scheduler.spec_stats
    assert stats.num_drafts > 0 and stats.mean_acceptance_length > 1.5, stats
