"""``use_beam_search: true`` at /v1/completions and /v1/chat/completions (n = beam width): the
beams equal ``LLM.beam_search``'s on the same model, and the fields a beam search does not apply
(streaming, sampling filters, stop strings) are 400s naming the field."""

from __future__ import annotations

import pytest

from tests.server.test_api_combos import CHAT, MODEL, PROMPT
from tests.server.test_http_bad_input import assert_error, assert_still_serving

BEAM = {"use_beam_search": True, "n": 3, "temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def offline():
    from tessellm import LLM

    with LLM(max_model_len=1024) as llm:
        yield llm


def test_completions_beams_equal_offline(http, offline):
    from tessellm import BeamSearchParams

    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, **BEAM, "return_token_ids": True,
                                           "length_penalty": 0.5})
    assert r.status_code == 200, r.text
    body = r.json()
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2]
    want = offline.beam_search(PROMPT, BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.5))[0]
    prompt_len = len(choices[0]["prompt_token_ids"])
    tok = offline.get_tokenizer()
    for c, seq in zip(choices, want.sequences):
        assert c["token_ids"] == seq.tokens[prompt_len:]
        assert c["text"] == tok.decode([t for t in c["token_ids"] if t != tok.eos_token_id])
        assert c["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in choices)


def test_chat_beams(http):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, **BEAM, "n": 2})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2 and all(c["message"]["content"] for c in choices)
    assert choices[0]["message"]["content"] != choices[1]["message"]["content"]


@pytest.mark.parametrize("field,value", [("stream", True), ("top_p", 0.5), ("stop", ["x"]), ("seed", 3),
                                         ("bad_words", ["x"])])
@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": PROMPT}),
                                       ("/v1/chat/completions", {"messages": CHAT})])
def test_fields_beam_search_does_not_apply_are_400(http, path, body, field, value):
    r = http.post(path, json={"model": MODEL, **body, **BEAM, field: value})
    assert_error(r, 400, field, "beam search")
    assert_still_serving(http)


def test_length_penalty_needs_beam_search(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "length_penalty": 2.0})
    assert_error(r, 400, "length_penalty", "beam search")
