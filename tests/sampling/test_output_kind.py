"""``SamplingParams.output_kind`` (vLLM's ``RequestOutputKind``) on the real engine (tiny random
llama with the SmolLM2 tokenizer, cpu, float32), stepped by hand through ``llm.llm_engine``:
CUMULATIVE outputs grow, DELTA outputs add up to the same text, ids and logprobs, FINAL_ONLY
gives one output; ``generate`` returns the whole output whatever the kind."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tessellm.sampling_params import RequestOutputKind

ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=128)
PROMPT = "Once upon a time there was"


def _params(kind: RequestOutputKind, n: int = 1) -> SamplingParams:
    return SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2, n=n, output_kind=kind)


@pytest.fixture(scope="module")
def llm(tokenized_model):
    with LLM(tokenized_model, **ENGINE) as engine:
        yield engine


def _step_all(llm, kinds: dict) -> dict:
    engine = llm.llm_engine
    for rid, kind in kinds.items():
        engine.add_request(rid, PROMPT, _params(kind))
    seen: dict = {rid: [] for rid in kinds}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    return seen


def test_each_kind_against_generate(llm):
    whole = llm.generate([PROMPT], _params(RequestOutputKind.DELTA), use_tqdm=False)[0].outputs[0]
    assert len(whole.token_ids) == 8 and whole.text and len(whole.logprobs) == 8
    seen = _step_all(llm, {"c": RequestOutputKind.CUMULATIVE, "d": RequestOutputKind.DELTA,
                           "f": RequestOutputKind.FINAL_ONLY})
    cumulative = [o.outputs[0] for o in seen["c"]]
    assert [len(c.token_ids) for c in cumulative] == list(range(1, 9))
    assert (cumulative[-1].text, cumulative[-1].token_ids) == (whole.text, whole.token_ids)
    deltas = [o.outputs[0] for o in seen["d"]]
    assert all(len(d.token_ids) == 1 for d in deltas) and seen["d"][-1].finished
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert [lp for d in deltas for lp in d.logprobs] == whole.logprobs
    assert len(seen["f"]) == 1 and seen["f"][0].finished
    assert seen["f"][0].outputs[0].token_ids == whole.token_ids


def test_the_callers_params_are_left_as_given(llm):
    params = _params(RequestOutputKind.CUMULATIVE)
    distinct = [_params(RequestOutputKind.DELTA), _params(RequestOutputKind.FINAL_ONLY)]
    outs = llm.generate([PROMPT] * 3, [params] + distinct, use_tqdm=False)
    assert params.output_kind == RequestOutputKind.CUMULATIVE
    assert [p.output_kind for p in distinct] == [RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY]
    assert all(o.finished and len(o.outputs[0].token_ids) == 8 for o in outs)


def test_output_kind_is_checked_and_survives_msgpack():
    assert SamplingParams(output_kind=1).output_kind is RequestOutputKind.DELTA  # as the core receives it
    for wrong in ("delta", True, False, 1.0):  # True == 1 == DELTA: a bool is a mistake, not a kind
        with pytest.raises(ValueError, match="output_kind must be a RequestOutputKind"):
            SamplingParams(output_kind=wrong)


def test_cumulative_outputs_are_snapshots(llm):
    """An output kept from an earlier step does not grow with the request (its token ids and
    logprobs are its own), and the final output matches generate's."""
    engine = llm.llm_engine
    engine.add_request("snap", PROMPT, _params(RequestOutputKind.CUMULATIVE))
    kept = []
    while engine.has_unfinished_requests():
        kept += [(o, len(o.outputs[0].token_ids)) for o in engine.step()]
    assert [size for _, size in kept] == list(range(1, 9))
    for out, size in kept:
        sample = out.outputs[0]
        assert len(sample.token_ids) == size and len(sample.logprobs) == size
    whole = llm.generate([PROMPT], _params(RequestOutputKind.CUMULATIVE), use_tqdm=False)[0].outputs[0]
    assert kept[-1][0].outputs[0].token_ids == whole.token_ids
    assert kept[-1][0].outputs[0].logprobs == whole.logprobs


def test_delta_sends_prompt_logprobs_in_the_first_output_only(llm):
    """vLLM's: a DELTA request's prompt logprobs come once, with its first output; CUMULATIVE
    outputs carry them every time."""
    engine = llm.llm_engine
    for rid, kind in (("pd", RequestOutputKind.DELTA), ("pc", RequestOutputKind.CUMULATIVE)):
        engine.add_request(rid, PROMPT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                       prompt_logprobs=1, output_kind=kind))
    seen: dict = {"pd": [], "pc": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    delta, cumulative = seen["pd"], seen["pc"]
    assert len(delta) == len(cumulative) == 4
    num_prompt = len(delta[0].prompt_token_ids)
    assert len(delta[0].prompt_logprobs) == num_prompt and delta[0].prompt_logprobs[0] is None
    assert all(o.prompt_logprobs is None for o in delta[1:])
    assert all(o.prompt_logprobs == delta[0].prompt_logprobs for o in cumulative)
    folded = delta[0]
    for later in delta[1:]:  # what AsyncLLM's stream hands a consumer that fell behind
        folded.add(later)
    assert folded.prompt_logprobs == cumulative[-1].prompt_logprobs
