"""Drop-in for vLLM's server: what a client switching over from vLLM relies on, over real HTTP
against the bundled SmolLM2 (conftest.py's shared server): ``prompt_logprobs`` in vLLM's shape,
the ``usage`` key of stream chunks as OpenAI/vLLM send it, and a keep-alive connection that
survives a 500."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Say hi"}]


def _events(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def _check_prompt_logprobs(plp: list, prompt_ids: list[int], k: int) -> None:
    """vLLM's shape: one entry per prompt token, None first, then token id (a string key in
    JSON) -> {logprob, rank, decoded_token}, holding the prompt's own token and the top k."""
    assert len(plp) == len(prompt_ids) and plp[0] is None
    for tid, entry in zip(prompt_ids[1:], plp[1:]):
        assert str(tid) in entry, (tid, entry)
        assert len(entry) in (k, k + 1), entry  # the token itself may be one of the top k
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:k] == list(range(1, k + 1)), entry
        for v in entry.values():
            assert set(v) == {"logprob", "rank", "decoded_token"} and v["logprob"] <= 0
            assert isinstance(v["decoded_token"], str)
        best = min(entry.values(), key=lambda v: v["rank"])
        assert best["logprob"] == max(v["logprob"] for v in entry.values())


def test_prompt_logprobs_completions(http):
    """vLLM extra ``prompt_logprobs`` (was a 400 'unrecognized'): in the choice, and equal to what
    echo + logprobs scores for the same prompt."""
    ids = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    r = http.post("/v1/completions", json={**body, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    _check_prompt_logprobs(choice["prompt_logprobs"], ids, 2)
    echo = http.post("/v1/completions", json={**body, "echo": True, "logprobs": 0, "max_tokens": 0}).json()
    scored = echo["choices"][0]["logprobs"]["token_logprobs"]
    got = [None] + [e[str(t)]["logprob"] for t, e in zip(ids[1:], choice["prompt_logprobs"][1:])]
    assert got[1:] == pytest.approx(scored[1:len(ids)], abs=1e-4) and scored[0] is None
    # not asked: no prompt_logprobs key in the choice
    assert "prompt_logprobs" not in http.post("/v1/completions", json=body).json()["choices"][0]


def test_prompt_logprobs_chat(http):
    """At /v1/chat/completions vLLM puts prompt_logprobs on the response, not in the choice."""
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 1, "temperature": 0}
    ids = http.post("/tokenize", json={"model": MODEL, "messages": CHAT}).json()["tokens"]
    r = http.post("/v1/chat/completions", json={**body, "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["prompt_tokens"] == len(ids)
    _check_prompt_logprobs(out["prompt_logprobs"], ids, 1)


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": PROMPT}),
                                       ("/v1/chat/completions", {"messages": CHAT})])
def test_prompt_logprobs_refusals(http, path, body):
    """As vLLM: not with stream=true; over --max-logprobs (5 here) a 400 naming the field."""
    body = {"model": MODEL, **body, "max_tokens": 1}
    for extra in ({"prompt_logprobs": 1, "stream": True}, {"prompt_logprobs": 6}, {"prompt_logprobs": -2}):
        r = http.post(path, json={**body, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": PROMPT}),
                                       ("/v1/chat/completions", {"messages": CHAT})])
def test_stream_chunks_usage_key(http, path, body):
    """OpenAI and vLLM: without stream_options.include_usage a chunk has no usage key (every chunk
    carried "usage": null); with it each chunk has usage null and a last chunk with empty choices
    carries the totals; continuous_usage_stats only counts together with include_usage."""
    body = {"model": MODEL, **body, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    for options in (None, {"include_usage": False}, {"continuous_usage_stats": True}):
        events = _events(http, path, {**body, **({"stream_options": options} if options else {})})
        assert events and all("usage" not in e for e in events), (options, events)
        assert all(e["choices"] for e in events)
    *chunks, last = _events(http, path, {**body, "stream_options": {"include_usage": True}})
    assert chunks and all("usage" in e and e["usage"] is None for e in chunks)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3


def _serve(app) -> tuple[object, int]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return server, sock.getsockname()[1]


def _read_response(f) -> tuple[int, dict, bytes]:
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline().strip()):
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    return status, headers, f.read(int(headers["content-length"]))


def test_unhandled_error_keeps_the_connection():
    """A route's unexpected exception is a 500 with an OpenAI error object, and the keep-alive
    connection stays usable (Starlette's ServerErrorMiddleware re-raised it after answering,
    and uvicorn then closed the connection: the client's next request hit a dead socket).
    The server's own error handling (add_error_handling, used by build_app) under real uvicorn;
    the route that fails is the test's."""
    from fastapi import FastAPI

    from tessellm.entrypoints.openai.api_server import add_error_handling
    from tessellm.entrypoints.openai.lifecycle import Lifecycle
    from tessellm.entrypoints.openai.server_config import ServerConfig

    app = FastAPI()

    @app.get("/boom")
    async def boom():
        raise RuntimeError("kaput")

    @app.get("/fine")
    async def fine():
        return {"ok": True}

    add_error_handling(app, ServerConfig(["m"]), Lifecycle())
    server, port = _serve(app)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn, conn.makefile("rb") as f:
            for path, want in (("/boom", 500), ("/fine", 200), ("/boom", 500), ("/fine", 200)):
                conn.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                status, headers, body = _read_response(f)
                assert status == want and headers.get("connection") != "close", (path, status, headers)
                if want == 500:
                    err = json.loads(body)["error"]
                    assert err["type"] == "server_error" and "RuntimeError: kaput" in err["message"]
    finally:
        server.should_exit = True
