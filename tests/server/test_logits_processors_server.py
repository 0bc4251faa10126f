"""``tessellm serve --logits-processors module:Class``: the processor is loaded by name in the
engine core process; ``vllm_xargs`` reach it as SamplingParams.extra_args; arguments its
``validate_params`` refuses are a 400 naming the problem, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import MODEL


@pytest.fixture(scope="module")
def http(server_factory):
    srv = server_factory(["--logits-processors", "tests.sampling.logits_procs:DummyLogitsProcessor"])
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


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "Hi"}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})])
def test_validate_params_refusal_is_a_400(http, path, body):
    r = http.post(path, json={"model": MODEL, **body, "max_tokens": 2, "vllm_xargs": {"target_token": "x"}})
    assert r.status_code == 400, r.text
    assert "target_token must be a non-negative integer" in r.json()["error"]["message"], r.text
    assert _complete(http).status_code == 200
