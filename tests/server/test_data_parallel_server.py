"""``tessellm serve -dp 2``: one API server over two engine-core processes, end to end over HTTP
(a tiny random Llama with a tiny tokenizer: two cores start in seconds). Requests reach both cores, streaming and non-streaming answers agree,
/metrics labels each engine, each core loads ``--logits-processors`` by name, and a killed core
fails /health and the in-flight stream clearly. Greedy equality with one engine and the
balancer's policy: tests/distributed/test_data_parallel.py.

One server for the module (two cores start: time), the test that kills a core last.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal

import httpx
import pytest

PROCS = "tests.sampling.logits_procs"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small",
           "The three primary colors are"]


def _complete(srv, prompt: str, stream: bool = False) -> str:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0.0, "stream": stream}
    if not stream:
        r = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, json=body, timeout=120)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]
    text = ""
    with httpx.stream("POST", f"{srv.url}/v1/completions", headers=srv.headers, json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def _tiny_model(path: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.tiny_tokenizer import train_bpe

    raw = train_bpe(PROMPTS + ["Tell me everything"], ["<pad>", "<s>", "</s>"], 300)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).float().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dp_server(server_factory, tmp_path_factory):
    """Two cores, each with the dummy processor (it changes only the rows that ask for it)."""
    model = _tiny_model(str(tmp_path_factory.mktemp("dp") / "model"))
    return server_factory([model, "-dp", "2", "--logits-processors", f"{PROCS}:DummyLogitsProcessor"])


def test_data_parallel_cores_apply_the_processor(dp_server):
    """Each engine core loads the processor by name; requests on both cores are forced where
    they ask, and a refused argument is a 400 from whichever core checks it."""
    srv = dp_server
    body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "logprobs": 0}

    def forced(target: int) -> list[str]:
        r = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, timeout=120,
                       json={**body, "vllm_xargs": {"target_token": target}})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"]["tokens"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(forced, [28, 29, 28, 29] * 2))
    assert all(len(set(tokens)) == 1 and len(tokens) == 4 for tokens in answers)
    assert answers[0] == answers[2] != answers[1] == answers[3]
    assert all(e["requests_sent_total"] > 0 for e in srv.stats()["engines"])  # both cores served
    r = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, timeout=120,
                   json={**body, "vllm_xargs": {"target_token": "x"}})
    assert r.status_code == 400 and "target_token must be a non-negative integer" in r.json()["error"]["message"]


def test_data_parallel_server(dp_server):
    """Last: it kills a core."""
    srv = dp_server
    stats = srv.stats()
    assert stats["data_parallel_size"] == 2 and len({e["pid"] for e in stats["engines"]}) == 2
    assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        plain = list(pool.map(lambda p: _complete(srv, p), PROMPTS))
        streamed = list(pool.map(lambda p: _complete(srv, p, stream=True), PROMPTS))
    assert streamed == plain and all(plain)
    engines = srv.stats()["engines"]
    assert all(e["requests_sent_total"] > 0 for e in engines), engines  # both cores took requests
    assert all(e["stats"]["prefix_cache_queries"] > 0 for e in engines), engines
    assert all(e["num_requests"] == 0 and e["num_tokens"] == 0 for e in engines), engines  # nothing owed
    # The load policy (default) and each core's figures for it: idle, all it was sent received.
    assert srv.stats()["data_parallel_balance"] == "load"
    assert all(e["stats"]["load"]["received"] == e["requests_sent_total"] and
               e["stats"]["load"]["running"] == e["stats"]["load"]["waiting"] == 0 for e in engines), engines
    metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
    assert 'tessellm:engine_num_requests_running{engine="1"' in metrics
    # Kill the core that takes the next request, mid-stream: the stream ends with an error
    # event naming it, /health and /ready fail, new requests get 503.
    lines, killed = [], None
    with httpx.stream("POST", f"{srv.url}/v1/completions", headers=srv.headers, timeout=60,
                      json={"prompt": "Tell me everything", "max_tokens": 1000, "stream": True,
                            "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if len(lines) == 3:
                    busy = [e for e in srv.stats()["engines"] if e["num_requests"] > 0]
                    assert len(busy) == 1, busy
                    killed = busy[0]["index"]
                    os.kill(busy[0]["pid"], signal.SIGKILL)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == "engine_dead" and f"engine core {killed} of 2" in error["message"], error
    health = httpx.get(f"{srv.url}/health", timeout=30)
    assert health.status_code == 503 and f"engine core {killed} of 2" in health.json()["error"]["message"]
    assert httpx.get(f"{srv.url}/ready", timeout=30).status_code == 503
    r = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, json={"prompt": "Hi"}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
