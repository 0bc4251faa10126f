"""vLLM's request fields ``priority`` (with --scheduling-policy priority), ``prompt_logprobs`` /
chat ``top_logprobs`` of -1 (the whole vocabulary; with --max-logprobs -1) and ``vllm_xargs``
(into SamplingParams.extra_args), over HTTP; and their 400s."""

from __future__ import annotations

import math

import httpx
import pytest

from tests.server.conftest import MODEL

CHAT = [{"role": "user", "content": "Hi"}]
VOCAB = 49152  # the bundled SmolLM2's


@pytest.fixture(scope="module")
def open_server(server_factory):
    """Priority scheduling, no logprobs limit, requests logged (their SamplingParams shown)."""
    return server_factory(["--scheduling-policy", "priority", "--max-logprobs", "-1",
                           "--enable-log-requests"])


@pytest.fixture()
def open_http(open_server):
    with httpx.Client(base_url=open_server.url, headers=open_server.headers, timeout=300) as c:
        yield c


def _sums_to_one(entries) -> bool:
    return math.isclose(sum(math.exp(e) for e in entries), 1.0, rel_tol=1e-3)


def test_whole_vocabulary_prompt_and_top_logprobs(open_http):
    r = open_http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi there", "max_tokens": 1,
                                                "prompt_logprobs": -1})
    assert r.status_code == 200, r.text
    rows = r.json()["choices"][0]["prompt_logprobs"]
    assert rows[0] is None and len(rows) > 1
    for row in rows[1:]:
        assert len(row) == VOCAB and _sums_to_one(v["logprob"] for v in row.values())
    r = open_http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 1,
                                                     "logprobs": True, "top_logprobs": -1})
    assert r.status_code == 200, r.text
    (token,) = r.json()["choices"][0]["logprobs"]["content"]
    assert len(token["top_logprobs"]) == VOCAB and _sums_to_one(t["logprob"] for t in token["top_logprobs"])


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "Hi"}),
                                       ("/v1/chat/completions", {"messages": CHAT})])
def test_priority_and_vllm_xargs_are_taken(open_http, open_server, path, body):
    xargs = {"tenant": "blue", "weight": 2, "ratio": 0.5, "tags": ["a", 1]}
    r = open_http.post(path, json={"model": MODEL, **body, "max_tokens": 2, "priority": -3,
                                   "vllm_xargs": xargs})
    assert r.status_code == 200, r.text
    assert "extra_args={'tenant': 'blue', 'weight': 2, 'ratio': 0.5, 'tags': ['a', 1]}" in open_server.log_tail(200)


@pytest.mark.parametrize("extra,param", [
    ({"priority": "high"}, "priority"),
    ({"priority": 1.5}, "priority"),
    ({"priority": 2**63}, "priority"),
    ({"vllm_xargs": {"a": {"nested": 1}}}, "vllm_xargs"),
    ({"vllm_xargs": "a=1"}, "vllm_xargs"),
    ({"prompt_logprobs": -2}, "prompt_logprobs"),
])
def test_bad_values_are_400s_naming_the_field(open_http, extra, param):
    r = open_http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1, **extra})
    assert r.status_code == 400, r.text
    assert param in (r.json()["error"]["param"] or "") + r.json()["error"]["message"], r.text


def test_completions_logprobs_minus_one_is_refused_as_in_vllm(open_http):
    r = open_http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1, "logprobs": -1})
    assert r.status_code == 400 and "logprobs" in r.text, r.text


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "Hi"}),
                                       ("/v1/chat/completions", {"messages": CHAT})])
def test_fcfs_server_refuses_priority_and_caps_whole_vocabulary(http, path, body):
    """The default server: first come, first served, --max-logprobs 5 (tests/server/conftest.py)."""
    body = {"model": MODEL, **body, "max_tokens": 1}
    r = http.post(path, json={**body, "priority": 1})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "priority", r.text
    assert "--scheduling-policy priority" in err["message"]
    r = http.post(path, json={**body, "priority": 1, "use_beam_search": True, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
    assert http.post(path, json={**body, "priority": 0}).status_code == 200
    r = http.post(path, json={**body, "prompt_logprobs": -1})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt_logprobs", r.text
    assert f"-1 (the whole vocabulary, {VOCAB} tokens), over this server's limit of 5" in err["message"]


def test_responses_take_priority_as_chat_does(open_http, http):
    """vLLM's /v1/responses field ``priority``: taken by a priority server, refused (naming the
    flag) by a first-come-first-served one, as at /v1/chat/completions."""
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 2, "priority": -3}
    r = open_http.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    r = http.post("/v1/responses", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "priority", r.text
    assert "--scheduling-policy priority" in err["message"]
