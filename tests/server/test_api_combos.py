"""Request shapes that real OpenAI / vLLM clients send, over real HTTP against the bundled SmolLM2
(the session's shared server from conftest.py): echo-only scoring (``echo`` + ``max_tokens: 0``,
lm-eval-harness's loglikelihood request), ``stream_options.continuous_usage_stats``, and the
``param`` of errors that SamplingParams raises. Every answer is checked field by field."""

from __future__ import annotations

import json

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Say hi"}]


def _events(http: httpx.Client, path: str, body: dict) -> list[dict]:
    """A streamed request's JSON events (the [DONE] sentinel checked and dropped)."""
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]]


def _error(r: httpx.Response, status: int, param: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    return err


def test_echo_with_max_tokens_zero_scores_the_prompt(http):
    """OpenAI and vLLM: echo + max_tokens 0 returns the prompt and its logprobs, no generation."""
    body = {"model": MODEL, "prompt": PROMPT, "echo": True, "logprobs": 1, "temperature": 0}
    r = http.post("/v1/completions", json={**body, "max_tokens": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    assert choice["text"] == PROMPT
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == PROMPT
    assert lp["token_logprobs"][0] is None and all(x is not None for x in lp["token_logprobs"][1:])
    assert out["usage"]["completion_tokens"] == 0
    assert out["usage"]["prompt_tokens"] == len(lp["tokens"])
    assert choice["finish_reason"] == "length"
    # the prompt part equals what echo with one generated token reports
    one = http.post("/v1/completions", json={**body, "max_tokens": 1}).json()["choices"][0]["logprobs"]
    n = len(lp["tokens"])
    assert one["tokens"][:n] == lp["tokens"] and one["text_offset"][:n] == lp["text_offset"]
    assert one["token_logprobs"][0] is None
    assert one["token_logprobs"][1:n] == pytest.approx(lp["token_logprobs"][1:], abs=1e-4)
    # streamed: the prompt once, no generated text, usage 0 completion tokens
    events = _events(http, "/v1/completions", {**body, "max_tokens": 0, "n": 2,
                                               "stream_options": {"include_usage": True}})
    texts: dict[int, str] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {0: PROMPT, 1: PROMPT}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 0
    # max_tokens 0 without echo is still refused, by name
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 0})
    assert "echo" in _error(r, 400, "max_tokens")["message"]
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 0})
    _error(r, 400, "max_tokens")


@pytest.mark.parametrize("extra,param", [
    ({"stop": ""}, "stop"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_sampling_params_errors_name_the_field(http, extra, param):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **extra})
    _error(r, 400, param)
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2, **extra})
    _error(r, 400, param)


def test_engine_side_refusals_name_the_field(http):
    """Checks only the model can make (token ids against its vocabulary) come back with the
    field as ``param`` too, not only in the message."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "stop_token_ids": [10 ** 7]}
    assert "outside the vocabulary" in _error(http.post("/v1/completions", json=body), 400,
                                              "stop_token_ids")["message"]
    chat = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "stop_token_ids": [10 ** 7]}
    _error(http.post("/v1/chat/completions", json=chat), 400, "stop_token_ids")


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": CHAT}),
    ("/v1/completions", {"prompt": [PROMPT, "Hello"]}),
])
def test_continuous_usage_stats(http, path, body):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries usage (the prompt's
    tokens and its choice's tokens so far); include_usage still adds the total at the end."""
    body = {"model": MODEL, **body, "max_tokens": 4, "n": 2, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = _events(http, path, body)
    *chunks, total = events
    assert total["choices"] == [] and total["usage"]["completion_tokens"] == 4 * 2 * (1 if "messages" in body else 2)
    seen: dict[int, int] = {}
    for e in chunks:
        (choice,) = e["choices"]
        u = e["usage"]
        assert u is not None and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"], e
        assert u["completion_tokens"] >= seen.get(choice["index"], 0)
        seen[choice["index"]] = u["completion_tokens"]
    assert sorted(seen.values()) == [4] * len(seen) and len(seen) == (2 if "messages" in body else 4)
    # without continuous_usage_stats the other chunks carry usage null
    events = _events(http, path, {**body, "stream_options": {"include_usage": True}})
    assert all(e["usage"] is None for e in events[:-1]) and events[-1]["usage"] is not None


def test_continue_final_message_and_chat_template_kwargs(http):
    """vLLM's chat extras: continue_final_message leaves the last assistant message open (greedy
    output = a completion of the same prompt text without the end-of-turn); chat_template_kwargs
    reach the template, and apply_chat_template's own arguments are refused by name."""
    partial = [*CHAT, {"role": "assistant", "content": "Hello! My name"}]
    body = {"model": MODEL, "messages": partial, "max_tokens": 5, "temperature": 0}
    r = http.post("/v1/chat/completions", json={**body, "add_generation_prompt": False,
                                                "continue_final_message": True})
    assert r.status_code == 200, r.text
    closed = http.post("/tokenize", json={"model": MODEL, "messages": partial,
                                          "add_generation_prompt": False}).json()["tokens"]
    text = http.post("/detokenize", json={"model": MODEL, "tokens": closed}).json()["prompt"]
    end = text.rindex("Hello! My name") + len("Hello! My name")
    assert text[end:].strip(), text  # the closed form has an end-of-turn after the content
    want = http.post("/v1/completions", json={"model": MODEL, "prompt": text[:end], "max_tokens": 5,
                                              "temperature": 0}).json()
    got = r.json()
    assert got["choices"][0]["message"]["content"] == want["choices"][0]["text"]
    assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    open_ids = http.post("/tokenize", json={"model": MODEL, "messages": partial, "add_generation_prompt": False,
                                            "continue_final_message": True}).json()["tokens"]
    assert len(open_ids) == want["usage"]["prompt_tokens"] and open_ids == closed[:len(open_ids)]
    r = http.post("/v1/chat/completions", json={**body, "continue_final_message": True})
    _error(r, 400, "continue_final_message")
    # kwargs the template does not use change nothing; reserved ones are refused
    plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    r = http.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == plain, r.text
    r = http.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"tokenize": True}})
    assert "tokenize" in _error(r, 400, "chat_template_kwargs")["message"]


@pytest.mark.parametrize("extra,param", [
    ({"seed": 2**64 + 5}, "seed"),
    ({"seed": -2**63 - 1}, "seed"),
    ({"top_k": 2**70}, "top_k"),
])
def test_integers_past_64_bits_are_a_400(http, extra, param):
    """A seed or top_k that no 64-bit integer holds was a 500 (msgpack overflow on the way to the
    engine core); vLLM bounds seed to int64. The server keeps serving."""
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **extra})
    _error(r, 400, param)
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2, **extra})
    _error(r, 400, param)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2,
                                           "seed": 2**63 - 1, "top_k": 2**31})
    assert r.status_code == 200, r.text


def test_schema_integers_past_64_bits_are_a_400(http):
    """A JSON schema with an integer past 64 bits where xgrammar does not look (examples, default)
    reached the engine core's msgpack and was a 500."""
    schema = {"type": "object", "examples": [{"a": 2**70}]}
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    r = http.post("/v1/chat/completions", json={**body, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert "64" in _error(r, 400, "response_format")["message"]
    r = http.post("/v1/chat/completions", json={**body, "guided_json": {**schema, "default": -2**64}})
    _error(r, 400, "guided_json")
    r = http.post("/v1/chat/completions", json={**body, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "examples": [{"a": 2**62}]}}}})
    assert r.status_code == 200, r.text


def test_streamed_n2_chat_with_logprobs_matches_the_whole_response(http):
    """n > 1 streamed with logprobs: a role chunk per choice first, each choice's deltas and logprobs
    under its own index, one finish_reason per choice, all equal to the non-streamed response."""
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "n": 2, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    whole = http.post("/v1/chat/completions", json=body).json()
    events = _events(http, "/v1/chat/completions", body)
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [e["choices"][0]["index"] for e in events[:2]] == [0, 1]
    text, tokens, reasons = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}
    for e in events[2:]:
        (c,) = e["choices"]
        text[c["index"]] += c["delta"].get("content", "")
        tokens[c["index"]] += [t["token"] for t in (c["logprobs"] or {}).get("content") or []]
        if c["finish_reason"]:
            reasons[c["index"]].append(c["finish_reason"])
    for w in whole["choices"]:
        i = w["index"]
        assert text[i] == w["message"]["content"] == "".join(tokens[i])
        assert tokens[i] == [t["token"] for t in w["logprobs"]["content"]]
        assert all(len(t["top_logprobs"]) == 2 for t in w["logprobs"]["content"])
        assert reasons[i] == [w["finish_reason"]]


def test_prompt_over_the_context_has_openais_code(http):
    """A prompt at or over max_model_len (1024 here): 400 with code "context_length_exceeded" and
    "maximum context length" in the message (what OpenAI clients and LiteLLM match on)."""
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": [100] * 1024, "max_tokens": 1})
    err = _error(r, 400, "prompt")
    assert err["code"] == "context_length_exceeded" and "maximum context length is 1024" in err["message"]
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": [[1, 2], [100] * 1500], "max_tokens": 1})
    assert _error(r, 400, "prompt")["code"] == "context_length_exceeded"
    long_chat = [{"role": "user", "content": "hello " * 1100}]
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": long_chat, "max_tokens": 1})
    err = _error(r, 400, "messages")
    assert err["code"] == "context_length_exceeded" and "maximum context length" in err["message"]
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 300000}]})
    assert _error(r, 400, "messages")["code"] == "context_length_exceeded"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": [[]], "max_tokens": 1})
    assert _error(r, 400, "prompt")["code"] is None  # empty: not a context-length error


def test_empty_model_name_means_the_served_model(http):
    """vLLM (and clients that always send the field) treat "model": "" like no model: the served one."""
    r = http.post("/v1/completions", json={"model": "", "prompt": PROMPT, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == MODEL, r.text
    r = http.post("/v1/chat/completions", json={"model": "", "messages": CHAT, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == MODEL, r.text
    r = http.post("/v1/completions", json={"model": "gpt-4o", "prompt": PROMPT, "max_tokens": 1})
    assert _error(r, 404, "model")["code"] == "model_not_found"
