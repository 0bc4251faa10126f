"""``tessellm serve --logits-processors module:Class``: the processor is loaded by name in the
engine core process; ``vllm_xargs`` reach it as SamplingParams.extra_args; arguments its
``validate_params`` refuses are a 400 naming the problem, and the server keeps serving. A
processor that raises fails its step's requests with vLLM's finish reason "error": a 500 with
vLLM's error object, or a stream's last event before ``[DONE]``; counted under
``request_success_total{finished_reason="error"}``; the next request is served."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL

PROCS = "tests.sampling.logits_procs"
INTERNAL_ERROR = {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None,
                            "code": 500}}
ROUTES = [("/v1/completions", {"prompt": "Hi"}),
          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]


@pytest.fixture(scope="module")
def http(server_factory):
    srv = server_factory(["--logits-processors", f"{PROCS}:DummyLogitsProcessor", f"{PROCS}:RaisingProcessor"])
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=300) as client:
        yield client


def _complete(http, **extra):
    return http.post("/v1/completions", json={"model": MODEL, "prompt": "The capital of France is",
                                              "max_tokens": 5, "temperature": 0, "logprobs": 0, **extra})


def test_vllm_xargs_select_the_processor_per_request(http):
    forced = _complete(http, vllm_xargs={"target_token": 28})
    assert forced.status_code == 200, forced.text
    tokens = forced.json()["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == 5 and len(set(tokens)) == 1
    plain = _complete(http)
    assert plain.status_code == 200 and plain.json()["choices"][0]["logprobs"]["tokens"] != tokens


@pytest.mark.parametrize("path,body", ROUTES)
def test_validate_params_refusal_is_a_400(http, path, body):
    r = http.post(path, json={"model": MODEL, **body, "max_tokens": 2, "vllm_xargs": {"target_token": "x"}})
    assert r.status_code == 400, r.text
    assert "target_token must be a non-negative integer" in r.json()["error"]["message"], r.text
    assert _complete(http).status_code == 200


def _errors_counted(http) -> float:
    text = http.get("/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "tessellm:request_success_total" and sample.labels["finished_reason"] == "error")


@pytest.mark.parametrize("path,body", ROUTES)
def test_a_failed_generation_is_vllms_500(http, path, body):
    before = _errors_counted(http)
    r = http.post(path, json={"model": MODEL, **body, "max_tokens": 4, "vllm_xargs": {"boom": 1}})
    assert r.status_code == 500, r.text
    assert r.json() == INTERNAL_ERROR
    assert _errors_counted(http) == before + 1
    assert _complete(http).status_code == 200  # the next request, in later steps, is served


@pytest.mark.parametrize("path,body", ROUTES)
def test_a_failed_stream_ends_with_an_error_event_then_done(http, path, body):
    request = {"model": MODEL, **body, "max_tokens": 4, "stream": True, "vllm_xargs": {"boom": 1}}
    with http.stream("POST", path, json=request) as r:
        assert r.status_code == 200
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2]) == INTERNAL_ERROR
    assert all("error" not in json.loads(e) for e in events[:-2])  # chunks before it (chat: the role)
    assert _complete(http).status_code == 200

