"""Bad input over real HTTP: the right status and an OpenAI error object every time (400, never
FastAPI's 422), and the server keeps serving the next good request."""

from __future__ import annotations

import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}


def assert_error(r: httpx.Response, status: int, param=None, *words):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err["message"]
    return err


def assert_still_serving(http: httpx.Client):
    r = http.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_malformed_json(http, path):
    r = http.post(path, content=b'{"prompt": "Hi", ', headers={"content-type": "application/json"})
    assert_error(r, 400, None, "JSON")
    r = http.post(path, content=b'["not", "an", "object"]')
    assert_error(r, 400)
    assert_still_serving(http)


@pytest.mark.parametrize("body,param", [
    ({**COMPLETION, "max_tokens": "ten"}, "max_tokens"),
    ({**COMPLETION, "temperature": "hot"}, "temperature"),
    ({**COMPLETION, "prompt": 12.5}, "prompt"),
    ({**COMPLETION, "stream": "maybe"}, "stream"),
    ({**COMPLETION, "prompt": None}, "prompt"),
    ({"model": MODEL, "max_tokens": 2}, "prompt"),
])
def test_wrong_types_completions(http, body, param):
    assert_error(http.post("/v1/completions", json=body), 400, param)
    assert_still_serving(http)


@pytest.mark.parametrize("body,param", [
    ({**CHAT, "messages": "Hi"}, "messages"),
    ({**CHAT, "messages": []}, "messages"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "Hi"}]}, "messages.0.role"),
    ({**CHAT, "n": "two"}, "n"),
    ({**CHAT, "logprobs": True, "top_logprobs": "3"}, None),
])
def test_wrong_types_chat(http, body, param):
    r = http.post("/v1/chat/completions", json=body)
    if param is None:  # "3" is coerced by pydantic's lax mode: then it must just work
        assert r.status_code == 200, r.text
    else:
        assert_error(r, 400, param)
    assert_still_serving(http)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_negative_max_tokens(http, field):
    assert_error(http.post("/v1/chat/completions", json={**CHAT, field: -5}), 400, field)
    assert_error(http.post("/v1/completions", json={**COMPLETION, "max_tokens": 0}), 400, "max_tokens")
    assert_still_serving(http)


def test_out_of_range_values(http):
    for field, value in [("temperature", -1), ("top_p", 0), ("presence_penalty", 3), ("n", 0),
                         ("logprobs", -1), ("top_k", -2), ("min_p", 2)]:
        assert_error(http.post("/v1/completions", json={**COMPLETION, field: value}), 400, field)
    assert_error(http.post("/v1/completions", json={**COMPLETION, "logit_bias": {"x": 1}}), 400, "logit_bias")
    assert_error(http.post("/v1/completions", json={**COMPLETION, "logit_bias": {"99999999": 1}}), 400,
                 "logit_bias")
    assert_still_serving(http)


def test_limits(http):
    assert_error(http.post("/v1/completions", json={**COMPLETION, "n": 50}), 400, "n", "--max-n")
    assert_error(http.post("/v1/completions", json={**COMPLETION, "logprobs": 6}), 400, "logprobs", "5")
    assert_error(http.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 9}),
                 400, "top_logprobs")
    big = {**COMPLETION, "prompt": "x" * 1_100_000}  # over --max-body-bytes 1000000
    assert_error(http.post("/v1/completions", json=big), 413, None, "1000000")
    r = http.post("/v1/completions", json=COMPLETION, headers={"X-Big": "y" * 40_000})
    assert_error(r, 400, None, "headers")
    assert_still_serving(http)


def test_unknown_model(client, http):
    assert_error(http.post("/v1/completions", json={**COMPLETION, "model": "gpt-17"}), 404, "model", "gpt-17")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=CHAT["messages"], max_tokens=2)
    assert http.get("/v1/models/gpt-17").status_code == 404
    assert_still_serving(http)


def test_over_long_prompt(client, http):
    prompt = "hello " * 1500  # well over --max-model-len 1024
    err = assert_error(http.post("/v1/completions", json={**COMPLETION, "prompt": prompt}), 400, "prompt")
    assert "1024" in err["message"] and "tokens" in err["message"]
    num = int(err["message"].split("has ")[1].split(" tokens")[0])  # the prompt's token count
    assert num > 1024
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])
    assert "1024" in str(info.value)
    # prompt fits, prompt + max_tokens does not: refused with both counts
    err = assert_error(http.post("/v1/completions", json={**COMPLETION, "prompt": "hello " * 500,
                                                           "max_tokens": 900}), 400, "max_tokens", "1024")
    assert "900" in err["message"]
    assert_still_serving(http)


def test_missing_or_wrong_api_key(server):
    """The key guards the /v1 routes, as vLLM's AuthenticationMiddleware does: the others
    (SageMaker's /invocations, /tokenize, the health routes) and CORS preflights are open."""
    for path, body in [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]:
        r = httpx.post(server.url + path, json=body)
        assert_error(r, 401)
        r = httpx.post(server.url + path, json=body, headers={"Authorization": "Bearer wrong"})
        assert_error(r, 401)
    assert_error(httpx.get(server.url + "/v1/models"), 401)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    for path, body in [("/invocations", COMPLETION), ("/tokenize", {"prompt": "Hi"}),
                       ("/detokenize", {"tokens": [1, 2]})]:
        assert httpx.post(server.url + path, json=body).status_code == 200, path
    assert httpx.options(server.url + "/v1/models").status_code != 401  # a preflight has no key
    assert httpx.get(server.url + "/health").status_code == 200  # liveness needs no key


@pytest.mark.parametrize("body,param", [
    # tool_choice "auto" (the default with tools) needs a --tool-call-parser this server lacks
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({**CHAT, "functions": [{"name": "f"}]}, "functions"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "x"}}]}]},
     "messages.0.content.0.type"),  # (image_url parts to a text-only model: tests/multimodal)
    ({**CHAT, "frobnicate": True}, "frobnicate"),
    ({**COMPLETION, "suffix": "the end"}, "suffix"),
    ({**COMPLETION, "best_of": 3}, "best_of"),
])
def test_unsupported_fields_are_named(http, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    assert_error(http.post(path, json=body), 400, param, param.split(".")[0])
    assert_still_serving(http)


def test_audio_to_a_text_only_model_is_refused_by_name(http):
    body = {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]}
    assert_error(http.post("/v1/chat/completions", json=body), 400, "messages", "does not take audio")
    assert_still_serving(http)


def test_transcription_on_a_text_only_model_is_refused_by_name(http):
    r = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF", "audio/wav")})
    assert_error(r, 400, "model", "takes no audio")
    assert_still_serving(http)


def test_unknown_route_is_openai_shaped(http):
    assert_error(http.get("/v1/nothing-here"), 404)
