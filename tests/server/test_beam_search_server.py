"""``use_beam_search: true`` at /v1/completions and /v1/chat/completions (n = beam width): the
beams equal ``LLM.beam_search``'s on the same model, ``stream: true`` sends those beams as a
stream (as vLLM does: after the search), and the fields a beam search does not apply (sampling
filters, stop strings) are 400s naming the field."""

from __future__ import annotations

import pytest

from tests.server.test_api_combos import CHAT, MODEL, PROMPT, _events
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


def test_completions_stream_sends_the_beams(http):
    body = {"model": MODEL, "prompt": PROMPT, **BEAM, "return_token_ids": True}
    want = http.post("/v1/completions", json=body).json()
    events = _events(http, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    got: dict[int, dict] = {}
    for e in events[:-1]:
        (c,) = e["choices"]
        seen = got.setdefault(c["index"], {"text": "", "token_ids": [], "finish_reason": None})
        seen["text"] += c["text"]
        seen["token_ids"] += c["token_ids"]
        seen["finish_reason"] = seen["finish_reason"] or c["finish_reason"]
    assert got == {c["index"]: {k: c[k] for k in ("text", "token_ids", "finish_reason")}
                   for c in want["choices"]}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == want["usage"]


def test_chat_stream_sends_the_beams(http):
    body = {"model": MODEL, "messages": CHAT, **BEAM}
    want = http.post("/v1/chat/completions", json=body).json()["choices"]
    events = _events(http, "/v1/chat/completions", body)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = {c["index"]: "" for c in want}
    reasons = {}
    for e in events:
        (c,) = e["choices"]
        text[c["index"]] += c["delta"].get("content") or ""
        if c["finish_reason"]:
            reasons[c["index"]] = c["finish_reason"]
    assert [events[i]["choices"][0]["delta"]["role"] for i in range(3)] == ["assistant"] * 3
    assert text == {c["index"]: c["message"]["content"] for c in want}
    assert reasons == {c["index"]: c["finish_reason"] for c in want}


@pytest.mark.parametrize("field,value", [("top_p", 0.5), ("stop", ["x"]), ("seed", 3),
                                         ("bad_words", ["x"]), ("thinking_token_budget", 4)])
@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": PROMPT}),
                                       ("/v1/chat/completions", {"messages": CHAT})])
def test_fields_beam_search_does_not_apply_are_400(http, path, body, field, value):
    r = http.post(path, json={"model": MODEL, **body, **BEAM, field: value})
    assert_error(r, 400, field, "beam search")
    assert_still_serving(http)


def test_length_penalty_needs_beam_search(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "length_penalty": 2.0})
    assert_error(r, 400, "length_penalty", "beam search")


def test_stream_client_that_leaves_ends_the_search(server):
    """Keep-alives while the search runs; a client that leaves then ends it (not 1000 steps).
    Each step is new engine requests, so the prefix-cache lookups count the steps."""
    import time

    import httpx

    from tests.server.test_disconnect_and_concurrency import wait_idle

    def lookups() -> int:
        return server.stats()["stats"]["prefix_cache_queries"]

    wait_idle(server, 30)
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=server.headers, timeout=60,
                      json={"model": MODEL, "prompt": "An endless story:", **BEAM, "max_tokens": 1000,
                            "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line) == ": keep-alive"
        before = lookups()
        assert next(line for line in lines if line) == ": keep-alive"
        assert lookups() > before  # the search is under way
    wait_idle(server, 10)
    after = lookups()
    time.sleep(1.0)
    assert lookups() == after  # and ended: no later step was sent
