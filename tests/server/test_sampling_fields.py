"""vLLM's ``allowed_token_ids`` and ``bad_words`` at both endpoints: honoured (200, and the
output obeys them), bad values a 400 OpenAI error naming the field, the server still serving."""

from __future__ import annotations

import pytest

from tests.server.test_api_combos import CHAT, MODEL, PROMPT
from tests.server.test_http_bad_input import assert_error, assert_still_serving

ALLOWED = [1000, 2000, 3000, 4000]


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": PROMPT}),
                                       ("/v1/chat/completions", {"messages": CHAT})])
def test_allowed_token_ids(http, path, body):
    r = http.post(path, json={"model": MODEL, **body, "max_tokens": 6, "temperature": 1.0, "seed": 3,
                              "allowed_token_ids": ALLOWED, "return_token_ids": True, "n": 2})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["token_ids"] and set(choice["token_ids"]) <= set(ALLOWED)


def test_bad_words(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24, "temperature": 0}
    free = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert "Paris" in free  # the ban below has something to do
    r = http.post("/v1/chat/completions", json={**body, "bad_words": ["Paris"]})
    assert r.status_code == 200, r.text
    assert "Paris" not in r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("field,value,words", [
    ("allowed_token_ids", [], ["empty"]),
    ("allowed_token_ids", [5, 10**9], ["outside the vocabulary"]),
    ("allowed_token_ids", [-1], ["non-negative"]),
    ("bad_words", ["ok", ""], ["non-empty strings"]),
])
@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": PROMPT}),
                                       ("/v1/chat/completions", {"messages": CHAT})])
def test_bad_values_are_400(http, path, body, field, value, words):
    r = http.post(path, json={"model": MODEL, **body, "max_tokens": 2, field: value})
    assert_error(r, 400, field, *words)
    assert_still_serving(http)
