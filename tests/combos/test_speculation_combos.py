"""Speculative decoding (n-gram) combined with the sampling features on the bundled SmolLM2:
a repetitive prompt makes the drafts accepted, so several tokens arrive per step, and every
request's output (text, token ids, logprobs, finish) equals the run without speculation."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tessellm.structured_output import StructuredOutputsParams as S

PROMPT = "a b c d e f g h a b c d e f g h a b c d e f g h a b c d e f g h a b c"
NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


def _params() -> dict[str, SamplingParams]:
    return {
        # The stop string is inside a step's accepted drafts: the output ends at its token.
        "stop": SamplingParams(temperature=0, max_tokens=30, stop=[" f"], logprobs=2),
        "stop_included": SamplingParams(temperature=0, max_tokens=30, stop=["g h"],
                                        include_stop_str_in_output=True),
        # No stop string ends the output before min_tokens (vLLM's rule): the second "g".
        "min_tokens": SamplingParams(temperature=0, max_tokens=30, stop=["g"], min_tokens=8),
        # EOS (id 2) made the argmax everywhere: banned in the rows before min_tokens only, so
        # the verify step's row at position 6 (inside the accepted drafts' window) samples it.
        "min_tokens_eos": SamplingParams(temperature=0, max_tokens=30, min_tokens=6, logit_bias={2: 30.0}),
        "stop_token": SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[265]),  # " c"
        "max_tokens": SamplingParams(temperature=0, max_tokens=7, logprobs=1),
        "seeded": SamplingParams(temperature=0.7, seed=3, max_tokens=20),
        "regex": SamplingParams(temperature=0, max_tokens=30,
                                structured_outputs=S(regex=r" d e f g( [a-h])+")),
    }


def _run(llm: LLM) -> dict:
    params = _params()
    outs = llm.generate([PROMPT] * len(params), list(params.values()), use_tqdm=False)
    return {name: o.outputs[0] for name, o in zip(params, outs)}


@pytest.fixture(scope="module")
def engines():
    with LLM(max_model_len=256) as plain, LLM(max_model_len=256, speculative_config=NGRAM) as spec:
        yield plain, spec


@pytest.fixture(scope="module")
def runs(engines):
    plain, spec = engines
    want, got = _run(plain), _run(spec)
    assert spec.engine.core.scheduler.spec_stats.num_accepted_tokens >= 20  # several tokens a step
    return want, got


@pytest.mark.parametrize("name", list(_params()))
def test_output_equals_the_run_without_speculation(runs, name):
    want, got = runs
    w, g = want[name], got[name]
    assert (g.text, g.token_ids, g.finish_reason, g.stop_reason) == \
           (w.text, w.token_ids, w.finish_reason, w.stop_reason)
    if w.logprobs is not None:
        assert len(g.logprobs) == len(g.token_ids)
        for a, b in zip(w.logprobs, g.logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


def test_stop_strings_end_at_their_token(runs):
    want, _ = runs
    assert want["stop"].text == " d e" and want["stop"].token_ids[-1] == 275  # " f" itself
    assert want["stop_included"].text == " d e f g h"
    assert want["min_tokens"].text == " d e f g h a b c d e f " and len(want["min_tokens"].token_ids) > 8
    assert len(want["min_tokens_eos"].token_ids) == 7 and want["min_tokens_eos"].token_ids[-1] == 2
    assert want["stop_token"].token_ids[-1] == 265 and want["stop_token"].finish_reason == "stop"
    assert len(want["max_tokens"].token_ids) == 7 and want["max_tokens"].finish_reason == "length"


def test_histories_shorter_than_the_longest_ngram(engines):
    """One-token prompts alone in a step: every history is shorter than prompt_lookup_max
    (default 5); this killed the engine (IndexError in the n-gram search)."""
    plain, spec = engines
    prompts = [{"prompt_token_ids": [t]} for t in (28, 253)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)] == want
