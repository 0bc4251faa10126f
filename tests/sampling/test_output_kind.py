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
    llm.generate([PROMPT], params, use_tqdm=False)
    assert params.output_kind == RequestOutputKind.CUMULATIVE


def test_output_kind_is_checked_and_survives_msgpack():
    assert SamplingParams(output_kind=1).output_kind is RequestOutputKind.DELTA  # as the core receives it
    with pytest.raises(ValueError, match="output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind="delta")
