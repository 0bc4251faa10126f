"""Status and tokenizer routes, SSE keep-alive, and what a dying engine core looks like."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import httpx

import tessellm

MODEL = "SmolLM2-135M-Instruct"


def test_health_ready_version(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    r = httpx.get(f"{server.url}/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert httpx.get(f"{server.url}/version").json() == {"version": tessellm.__version__}
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "tessellm:kv_cache_usage_perc" in metrics


def test_ready_while_the_core_is_busy(server):
    """/ready during a long generation: each probe 200 "ready" (the core's outputs, or its
    ping answered between steps, vouch for it), and the generation goes on to its last token.
    test_ready_after_warmup.py covers a core frozen in a step (200 without waiting for it)."""
    answers, chunks = [], 0
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=server.headers, timeout=120,
                      json={"prompt": "Once upon a time", "max_tokens": 120, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            chunks += 1
            if chunks % 30 == 1 and event["choices"]:
                probe = httpx.get(f"{server.url}/ready", timeout=30)
                answers.append((probe.status_code, probe.json()))
    assert answers and all(a == (200, {"status": "ready"}) for a in answers), answers
    assert event["usage"]["completion_tokens"] == 120


def test_tokenize_detokenize_roundtrip(http):
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world, tessellm!"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == 1024
    r = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert r.json()["prompt"] == "Hello world, tessellm!"
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 3
    r = http.post("/detokenize", json={"tokens": [10 ** 9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_chat_prompt_tokens_match_tokenize(http):
    messages = [{"role": "user", "content": "How many tokens is this?"}]
    count = http.post("/tokenize", json={"messages": messages}).json()["count"]
    r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == count


def test_sse_keepalive_while_prefilling(server):
    # a fresh 200-token prompt (no prefix-cache hit) takes several keep-alive intervals (0.2 s) to
    # prefill on this CPU: the stream sends SSE comments before its first token
    rng = random.Random(time.time())
    prompt = [rng.randrange(1000, 40000) for _ in range(200)]
    lines = []
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=server.headers, timeout=60,
                      json={"prompt": prompt, "max_tokens": 2, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                lines.append(line)
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert first_data > 0 and all(line == ": keep-alive" for line in lines[:first_data])
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


TEMPLATE = ("{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<<assistant>>{% endif %}")


def test_engine_crash_surfaces_as_errors(server_factory, tmp_path):
    """A second server (API key from the environment, --chat-template FILE, a served name): then
    kill its core process mid-stream. The stream ends with an error event, /ready and /health
    turn false, new requests get 503: nothing hangs."""
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    srv = server_factory(["--chat-template", str(template), "--served-model-name", "tiny", "extra",
                          "--responses-store-size", "4"],
                         env={"TESSELLM_API_KEY": "sk-from-env"}, api_key_flag=False)
    srv.api_key = "sk-from-env"
    assert httpx.get(f"{srv.url}/v1/models").status_code == 401  # the key came from the env
    models = httpx.get(f"{srv.url}/v1/models", headers=srv.headers).json()["data"]
    assert [m["id"] for m in models] == ["tiny", "extra"]
    messages = [{"role": "user", "content": "Hi"}]
    ids = httpx.post(f"{srv.url}/tokenize", headers=srv.headers, json={"messages": messages}).json()["tokens"]
    text = httpx.post(f"{srv.url}/detokenize", headers=srv.headers, json={"tokens": ids}).json()["prompt"]
    assert text == "<<user>>Hi\n<<assistant>>"
    pid = srv.stats()["engine_pid"]
    background = httpx.post(f"{srv.url}/v1/responses", headers=srv.headers, timeout=60, json={
        "input": "Tell me everything", "max_output_tokens": 900, "ignore_eos": True, "background": True}).json()
    lines = []
    with httpx.stream("POST", f"{srv.url}/v1/completions", headers=srv.headers, timeout=60,
                      json={"prompt": "Tell me everything", "max_tokens": 900, "stream": True,
                            "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if len(lines) == 3:
                    os.kill(pid, signal.SIGKILL)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == "engine_dead" and "engine core" in error["message"]
    assert httpx.get(f"{srv.url}/ready", timeout=30).status_code == 503
    assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 503
    r = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, json={"prompt": "Hi"}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    # a background response running when the core died is stored failed (not left in_progress)
    for _ in range(600):
        got = httpx.get(f"{srv.url}/v1/responses/{background['id']}", headers=srv.headers, timeout=30).json()
        if got["status"] not in ("queued", "in_progress"):
            break
        time.sleep(0.05)
    assert got["status"] == "failed" and got["error"]["code"] == "server_error", got
    assert "engine core is dead" in got["error"]["message"], got
