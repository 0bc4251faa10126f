"""vLLM's per-request ``kv_transfer_params`` at the OpenAI server: without a KV connector (or
not a JSON object) a 400 naming it, the server still serving; a ``ZmqPeerConnector``
producer's response to a ``do_remote_decode`` request carries ``kv_transfer_params`` at its
top level (completions, chat and responses), naming where its blocks are; a malformed key is a 400
naming it. A vLLM disaggregation proxy's flow through ``examples/disagg_proxy.py``: the
prefill request to the producer server, its response's params with the whole request to a
consumer server with no ``kv_peer`` (its ``allowed_producers`` listing the producer's host), which fetches the prompt's blocks from that producer over
TCP and answers the producer's greedy text."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import socket
import time

import httpx
import pytest

from tests.server.test_api_combos import MODEL, PROMPT
from tests.server.test_http_bad_input import assert_error, assert_still_serving

# vLLM's toy proxy's prefill request carries these (its NIXL fields unset)
PROXY_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                "remote_block_ids": None, "remote_host": None, "remote_port": None}
LONG = "The quick brown fox jumps over the lazy dog. " * 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peer(role: str, **extra) -> list:
    return ["--kv-transfer-config", json.dumps({"kv_connector": "ZmqPeerConnector", "kv_role": role,
                                                "kv_connector_extra_config": extra})]


@pytest.fixture(scope="module")
def producer(server_factory):
    """A producer server (ZmqPeerConnector) and its KV port."""
    port = _free_port()
    return server_factory(_peer("kv_producer", kv_port=port)), port


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": PROMPT}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                               "content": "Hi"}]})])
@pytest.mark.parametrize("value,words", [(PROXY_PARAMS, ["--kv-transfer-config"]),
                                         ([1], ["must be a JSON object"])])
def test_kv_transfer_params_without_a_connector_is_400(http, path, body, value, words):
    r = http.post(path, json={"model": MODEL, **body, "max_tokens": 2, "kv_transfer_params": value})
    assert_error(r, 400, "kv_transfer_params", *words)
    assert_still_serving(http)


def test_a_producers_response_carries_kv_transfer_params(producer):
    """vLLM's field at the response's top level, for /v1/completions, /v1/chat/completions and
    /v1/responses:
    the keys a proxy passes on (docs/kv_transfer.md); none without do_remote_decode; a
    malformed key a 400 naming it, the server still serving."""
    srv, port = producer
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=120) as p:
        for path, body in (("/v1/completions", {"prompt": LONG, "max_tokens": 1}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "max_tokens": 1}),
                           ("/v1/responses", {"input": LONG, "max_output_tokens": 1})):  # vLLM's too
            body = {"model": MODEL, **body, "temperature": 0}
            r = p.post(path, json={**body, "kv_transfer_params": PROXY_PARAMS})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            params, prompt_tokens = r.json()["kv_transfer_params"], usage.get("prompt_tokens", usage.get("input_tokens"))
            assert params == {"do_remote_prefill": True, "do_remote_decode": False,
                              "remote_engine_id": params["remote_engine_id"], "remote_host": "127.0.0.1",
                              "remote_port": port, "tp_size": 1,
                              "remote_num_tokens": prompt_tokens // 16 * 16}
            assert "kv_transfer_params" not in p.post(path, json=body).json()
        with p.stream("POST", "/v1/responses", json={**body, "stream": True, "kv_transfer_params": PROXY_PARAMS}) as s:
            last = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")][-1]
        assert last["type"] == "response.incomplete" and last["response"]["kv_transfer_params"]["remote_port"] == port
        r = p.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 1,
                                            "kv_transfer_params": {"do_remote_prefill": True,
                                                                   "remote_host": "h", "remote_port": "x"}})
        assert_error(r, 400, "kv_transfer_params", "remote_port", "1-65535")
        assert_still_serving(p)


def _counter(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    m = re.search(rf'^tessellm:{name}\{{[^}}]*\}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _proxy_module():
    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "disagg_proxy.py"
    spec = importlib.util.spec_from_file_location("disagg_proxy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a second server (~20 s on 2 cores); the unit and in-process tests cover the code
def test_a_vllm_proxys_prefill_then_decode_flow(producer, server_factory):
    """Through the example proxy (in process): the prefill request to the producer server, the
    decode request with its response's params to a consumer server that has no kv_peer: it
    loads the prompt's blocks from the producer the params name, and answers the producer's
    greedy text, streamed or not. A request naming a producer the consumer does not list
(allowed_producers) is a 400 naming the setting."""
    from fastapi.testclient import TestClient

    srv, _ = producer
    consumer = server_factory(_peer("kv_consumer", allowed_producers=["127.0.0.1"]))
    body = {"model": MODEL, "prompt": LONG, "temperature": 0, "max_tokens": 8}
    app = _proxy_module().build_app([srv.url], [consumer.url])
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=120) as p, \
            httpx.Client(base_url=consumer.url, headers=consumer.headers, timeout=120) as c, \
            TestClient(app, headers=srv.headers) as proxy:
        want = p.post("/v1/completions", json=body).json()["choices"][0]["text"]
        d = proxy.post("/v1/completions", json=body)
        assert d.status_code == 200, d.text
        assert d.json()["choices"][0]["text"] == want
        prompt_tokens = d.json()["usage"]["prompt_tokens"]
        with proxy.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == want
        for _ in range(50):  # the engine's stats reach /metrics within a moment
            hits = _counter(c, "kv_connector_hits_total")
            if hits:
                break
            time.sleep(0.1)
        assert hits >= prompt_tokens - 32  # the first request's blocks; the stream's hit the cache
        assert _counter(c, "kv_connector_remote_prefill_fallbacks_total") == 0
        # A producer the consumer does not list: refused before the engine, a 400 naming the fix
        elsewhere = {"do_remote_prefill": True, "remote_host": "10.6.6.6", "remote_port": 14579}
        for stream in (False, True):
            r = c.post("/v1/completions", json={**body, "stream": stream, "kv_transfer_params": elsewhere})
            assert_error(r, 400, "kv_transfer_params", "10.6.6.6:14579", "allowed_producers")
        assert_still_serving(c)


def test_the_proxy_never_passes_a_clients_own_producer_on():
    """The decode request carries the prefill engine's kv_transfer_params, or none: a client's
    own (naming a host of its choosing for the decode engine to reach) are dropped."""
    decode_body = _proxy_module().decode_body
    evil = {"do_remote_prefill": True, "remote_host": "10.6.6.6", "remote_port": 1}
    body = {"prompt": "x", "max_tokens": 4, "kv_transfer_params": evil}
    assert decode_body(body, None) == {"prompt": "x", "max_tokens": 4}
    mine = {"do_remote_prefill": True, "remote_host": "10.0.0.5", "remote_port": 14579}
    assert decode_body(body, mine) == {"prompt": "x", "max_tokens": 4, "kv_transfer_params": mine}
    assert body["kv_transfer_params"] == evil  # the client's body itself is not changed
