"""vLLM's ``logprob_token_ids`` and ``repetition_detection`` over HTTP (completions and chat,
streamed and not, n > 1), against the server's own top-k logprobs; their 400s."""

from __future__ import annotations

import json

import pytest

from tests.server.conftest import MODEL

CHAT = [{"role": "user", "content": "Name three colors."}]
PROMPT = "The capital of France is"


def _id(token: str) -> int:
    return int(token.removeprefix("token_id:"))


def _completion(http, **extra) -> dict:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
            "return_tokens_as_token_ids": True, **extra}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_completions_return_the_listed_ids_at_every_position(http):
    base = _completion(http, logprobs=5)["choices"][0]["logprobs"]
    top0 = [_id(t) for t in base["top_logprobs"][0]]  # position 0's top 5 (the token first)
    ids = top0[1:4] + [0]  # three of the top 5, and token 0, far from them
    got = _completion(http, logprobs=1, logprob_token_ids=ids)["choices"][0]["logprobs"]
    assert got["tokens"] == base["tokens"] and got["token_logprobs"] == pytest.approx(base["token_logprobs"], abs=1e-4)
    for pos, (token, top) in enumerate(zip(got["tokens"], got["top_logprobs"])):
        keys = [_id(t) for t in top]
        assert keys == [_id(token)] + [t for t in ids if t != _id(token)]  # the sampled one first
        for tid in ids:  # the ones the top 5 also holds: the same values
            key = f"token_id:{tid}"
            if key in base["top_logprobs"][pos]:
                assert top[key] == pytest.approx(base["top_logprobs"][pos][key], abs=1e-4)
            else:
                assert top[key] <= min(base["top_logprobs"][pos].values()) + 1e-4
    assert all(f"token_id:{t}" in got["top_logprobs"][0] for t in top0[1:4])
    streamed = []  # the same, streamed: each chunk's positions
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True,
            "return_tokens_as_token_ids": True, "logprobs": 1, "logprob_token_ids": ids}
    with http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                streamed += lp["top_logprobs"] if lp else []
    assert [list(t) for t in streamed] == [list(t) for t in got["top_logprobs"]]
    assert all(a == pytest.approx(b, abs=1e-5) for x, y in zip(streamed, got["top_logprobs"])
               for a, b in zip(x.values(), y.values()))


def test_chat_streamed_and_n_samples(http):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 3, "temperature": 0, "logprobs": True,
            "return_tokens_as_token_ids": True}
    base = http.post("/v1/chat/completions", json={**body, "top_logprobs": 5}).json()
    first = base["choices"][0]["logprobs"]["content"][0]
    ids = [_id(t["token"]) for t in first["top_logprobs"][:3]]
    events = []
    with http.stream("POST", "/v1/chat/completions",
                     json={**body, "logprob_token_ids": ids, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    content = [c for e in events for ch in e["choices"] if ch.get("logprobs") for c in ch["logprobs"]["content"]]
    assert [c["token"] for c in content] == [c["token"] for c in base["choices"][0]["logprobs"]["content"]]
    entry = content[0]
    assert [_id(t["token"]) for t in entry["top_logprobs"]] == [_id(entry["token"])] + [
        t for t in ids if t != _id(entry["token"])]
    for t in entry["top_logprobs"]:
        want = next(b["logprob"] for b in first["top_logprobs"] if b["token"] == t["token"])
        assert t["logprob"] == pytest.approx(want, abs=1e-4)
    many = http.post("/v1/chat/completions", json={**body, "logprob_token_ids": ids, "n": 2,
                                                   "temperature": 1.0, "seed": 3}).json()
    for choice in many["choices"]:
        for c in choice["logprobs"]["content"]:
            assert {_id(t["token"]) for t in c["top_logprobs"]} == set(ids) | {_id(c["token"])}


def _repeats(output: list[int], low: int, high: int, count: int) -> bool:
    for length in range(max(1, low), high + 1):
        tail = output[len(output) - length * count:] if length * count <= len(output) else None
        if tail and all(tail[j * length:(j + 1) * length] == tail[:length] for j in range(count)):
            return True
    return False


def test_repetition_detection_stops_with_finish_reason_repetition(http):
    body = {"model": MODEL, "prompt": "1, 1, 1, 1, 1, 1, 1,", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    full = http.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
    k = next(k for k in range(1, len(full) + 1) if _repeats(full[:k], 1, 4, 3))
    assert k < len(full)
    rep = {"max_pattern_size": 4, "min_pattern_size": 1, "min_count": 3}
    r = http.post("/v1/completions", json={**body, "repetition_detection": rep})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == full[:k]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("repetition", "repetition_detected")
    counted = [line for line in http.get("/metrics").text.splitlines()
               if line.startswith("tessellm:request_success_total{") and 'finished_reason="repetition"' in line]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1  # vLLM's label value
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 4,
                                                   "repetition_detection": {}}).json()
    assert chat["choices"][0]["finish_reason"] in ("stop", "length")  # all 0: off


@pytest.mark.parametrize("path,extra,param,words", [
    ("/v1/completions", {"logprob_token_ids": [1]}, "logprob_token_ids", "requires logprobs"),
    ("/v1/chat/completions", {"logprob_token_ids": [1]}, "logprob_token_ids", "requires logprobs"),
    ("/v1/completions", {"logprobs": 1, "logprob_token_ids": [1, 10**7]}, "logprob_token_ids", "outside the vocabulary"),
    ("/v1/completions", {"logprobs": 1, "logprob_token_ids": list(range(129))}, "logprob_token_ids", "limit of 128"),
    ("/v1/completions", {"logprobs": 1, "logprob_token_ids": [1], "use_beam_search": True, "n": 2},
     "logprob_token_ids", "beam search"),
    ("/v1/completions", {"logprobs": 1, "logprob_token_ids": [1], "echo": True, "max_tokens": 0},
     "logprob_token_ids", "echo"),
    ("/v1/completions", {"repetition_detection": {"max_pattern_size": 3, "min_count": 1}},
     "repetition_detection", "min_count must be >= 2"),
    ("/v1/chat/completions", {"repetition_detection": {"max_pattern_size": 3, "min_count": 2, "x": 1}},
     "repetition_detection", "unknown field"),
    # past 64 bits msgpack cannot carry it to the engine core: a 400, never a 500
    ("/v1/completions", {"repetition_detection": {"max_pattern_size": 2 ** 64, "min_count": 2}},
     "repetition_detection", "below 2**63"),
])
def test_bad_requests_are_400s_naming_the_field(http, path, extra, param, words):
    body = {"model": MODEL, "max_tokens": 2,
            **({"messages": CHAT} if path == "/v1/chat/completions" else {"prompt": PROMPT})}
    r = http.post(path, json={**body, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert http.post(path, json=body).status_code == 200  # the server serves on
