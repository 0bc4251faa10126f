"""vLLM's per-request ``kv_transfer_params`` at the OpenAI server: without a KV connector (or
not a JSON object) a 400 naming it, the server still serving; with ``ZmqPeerConnector`` a
vLLM disaggregation proxy's flow works unchanged: the prefill request (``do_remote_decode``,
``max_tokens: 1``) to the producer server, then the whole request to the consumer server,
which loads the prompt's blocks over TCP and answers the producer's greedy text."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": PROMPT}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                               "content": "Hi"}]})])
@pytest.mark.parametrize("value,words", [(PROXY_PARAMS, ["--kv-transfer-config"]),
                                         ([1], ["must be a JSON object"])])
def test_kv_transfer_params_without_a_connector_is_400(http, path, body, value, words):
    r = http.post(path, json={"model": MODEL, **body, "max_tokens": 2, "kv_transfer_params": value})
    assert_error(r, 400, "kv_transfer_params", *words)
    assert_still_serving(http)


def _counter(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    m = re.search(rf'^tessellm:{name}\{{[^}}]*\}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.slow  # two servers (~20 s on 2 cores); the unit and two-process tests cover the code
def test_a_vllm_proxys_prefill_then_decode_flow(server_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kv = {"kv_connector": "ZmqPeerConnector", "kv_role": "kv_producer",
          "kv_connector_extra_config": {"kv_port": port}}
    producer = server_factory(["--kv-transfer-config", json.dumps(kv)])
    kv = {"kv_connector": "ZmqPeerConnector", "kv_role": "kv_consumer",
          "kv_connector_extra_config": {"kv_peer": f"127.0.0.1:{port}"}}
    consumer = server_factory(["--kv-transfer-config", json.dumps(kv)])
    body = {"model": MODEL, "prompt": "The quick brown fox jumps over the lazy dog. " * 8,
            "temperature": 0, "max_tokens": 8}
    with httpx.Client(base_url=producer.url, headers=producer.headers, timeout=120) as p, \
            httpx.Client(base_url=consumer.url, headers=consumer.headers, timeout=120) as c:
        r = p.post("/v1/completions", json={**body, "max_tokens": 1, "kv_transfer_params": PROXY_PARAMS})
        assert r.status_code == 200, r.text
        params = r.json().get("kv_transfer_params")  # none needed: the blocks are found by content
        d = c.post("/v1/completions", json={**body, **({"kv_transfer_params": params} if params else {})})
        assert d.status_code == 200, d.text
        want = p.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert d.json()["choices"][0]["text"] == want
        prompt_tokens = d.json()["usage"]["prompt_tokens"]
        for _ in range(50):  # the engine's stats reach /metrics within a moment
            hits, saved = _counter(c, "kv_connector_hits_total"), _counter(p, "kv_connector_blocks_saved_total")
            if hits and saved:
                break
            time.sleep(0.1)
        assert 0 < hits < prompt_tokens and hits >= prompt_tokens - 32
        assert saved >= prompt_tokens // 16  # reported once written, also when the engine is idle
