"""Values that only the model can judge (its vocabulary, whether it has a tokenizer) are
refused by ``LLM`` with one ValueError naming the field and the fix, before anything is queued,
and the engine keeps serving. The vocabulary ones once raised inside an engine step and left
the engine unusable; stop strings on a model without a tokenizer were silently ignored."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams

VOCAB = 384  # tests/conftest.py TINY_COMMON


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(tiny_model_dir("llama"), dtype="float32", block_size=4, num_kv_blocks=64,
             max_model_len=64) as engine:
        yield engine


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=3, temperature=0, **kw)


@pytest.mark.parametrize("kw, words", [
    (dict(logprobs=VOCAB + 1), "logprobs is 385, over the vocabulary size 384"),
    (dict(prompt_logprobs=1000), "prompt_logprobs is 1000, over the vocabulary size 384"),
    (dict(logit_bias={VOCAB: 1.0}), r"logit_bias token id 384 is outside the vocabulary \[0, 384\)"),
    (dict(stop_token_ids=[5, 9999], min_tokens=2), r"stop_token_ids has 9999, outside the vocabulary \[0, 384\)"),
    (dict(stop=["x"]), "stop strings need the model's tokenizer.*use stop_token_ids"),  # were ignored
])
def test_refused_by_name_and_the_engine_serves_on(llm, kw, words):
    prompt = {"prompt_token_ids": [1, 2, 3, 4]}
    want = llm.generate(prompt, _greedy(), use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match=words):
        llm.generate([prompt, prompt], [_greedy(), _greedy(**kw)], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # the good request beside it was withdrawn
    assert llm.generate(prompt, _greedy(), use_tqdm=False)[0].outputs[0].token_ids == want


def test_whole_vocabulary_of_logprobs_is_allowed(llm):
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, _greedy(logprobs=VOCAB, prompt_logprobs=VOCAB),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].logprobs[0]) == VOCAB and len(out.prompt_logprobs[1]) == VOCAB


def test_a_failed_step_is_raised_again_not_a_confusing_error(tiny_model_dir):
    """A step that raises (here: the executor, made to fail once) loses its batch's state; the
    engine then raises that same error on every later call, with a note naming the way out,
    instead of an unrelated IndexError from the lost state."""
    with LLM(tiny_model_dir("llama"), dtype="float32", max_model_len=64) as llm:
        executor = llm.engine.core.executor
        real_submit = executor.submit

        def failing_submit(sched):
            executor.submit = real_submit
            raise RuntimeError("device lost")

        executor.submit = failing_submit
        prompt = {"prompt_token_ids": [1, 2, 3]}
        with pytest.raises(RuntimeError, match="device lost"):
            llm.generate(prompt, _greedy(), use_tqdm=False)
        with pytest.raises(RuntimeError, match="device lost") as err:
            llm.generate(prompt, _greedy(), use_tqdm=False)
        assert "create a new LLM" in " ".join(getattr(err.value, "__notes__", []))
