"""vLLM's server flags that change what a client sees, on one server started with all of them
as a `vllm serve` deployment would be: HTTPS (--ssl-*), --root-path, CORS (--allowed-origins
...), --middleware, --enable-request-id-headers, --response-role, --return-tokens-as-token-ids,
--default-chat-template-kwargs, --trust-request-chat-template, --enable-prompt-tokens-details,
--enable-force-include-usage and --enable-log-requests / --enable-log-outputs / --max-log-len. Real uvicorn, engine core and
the bundled model (conftest.py's launcher)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL, SERVER_ARGS, Server, _free_port, _launcher, stop_server

CHAT = [{"role": "user", "content": "Say hi"}]
# A template that shows one chat_template_kwargs variable (the bundled model's shows none).
TEMPLATE = ("{% if greeting %}[{{ greeting }}]{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm-flags")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    (d / "t.jinja").write_text(TEMPLATE)
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="tessellm-server-", suffix=".log", delete=False)
    args = [*_launcher(), "--host", "127.0.0.1", "--port", str(port), *SERVER_ARGS, "--api-key", API_KEY,
            "--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--root-path", "/api",
            "--allowed-origins", json.dumps([ORIGIN]), "--middleware", "tests.server.vllm_middleware.tag",
            "--enable-request-id-headers", "--response-role", "helper", "--return-tokens-as-token-ids",
            "--chat-template", str(d / "t.jinja"), "--default-chat-template-kwargs", '{"greeting": "hello"}',
            "--trust-request-chat-template", "--enable-prompt-tokens-details", "--enable-force-include-usage",
            "--enable-log-requests", "--enable-log-outputs", "--max-log-len", "12", "--no-kernel-warmup"]
    import os

    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    srv = Server(proc, port, log.name)
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, srv.log_tail()
        assert time.monotonic() < deadline, srv.log_tail()
        try:
            if httpx.get(f"https://127.0.0.1:{port}/ready", verify=False, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    yield srv
    stop_server(srv)


@pytest.fixture()
def https(tls_server):
    with httpx.Client(base_url=f"https://127.0.0.1:{tls_server.port}", verify=False, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def test_https_root_path_middleware_and_request_ids(tls_server, https):
    with pytest.raises(httpx.HTTPError):  # HTTPS only
        httpx.get(f"http://127.0.0.1:{tls_server.port}/ping", timeout=5)
    with open(tls_server.log_path) as f:  # the address the log gives is the one served
        assert f"on https://127.0.0.1:{tls_server.port} (API key required)" in f.read()
    for path in ("/v1/models", "/api/v1/models"):  # the proxy's prefix is taken off
        r = https.get(path)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL, (path, r.text)
        assert r.headers["x-tagged-by"] == "vllm-middleware"
        assert len(r.headers["x-request-id"]) == 32
    assert httpx.get(f"{https.base_url}/api/health", verify=False).status_code == 200  # open, as /health
    assert httpx.get(f"{https.base_url}/api/v1/models", verify=False).status_code == 401  # the key still
    r = https.post("/api/tokenize", json={"prompt": "hi"}, headers={"X-Request-Id": "job-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "job-42"


def test_cors(https):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{https.base_url}/v1/chat/completions", headers=preflight, verify=False)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN  # no key needed
    r = httpx.options(f"{https.base_url}/v1/chat/completions", verify=False,
                      headers={**preflight, "Origin": "https://other.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = https.get("/v1/models", headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN


def _prompt_text(https, out) -> str:
    return https.post("/detokenize", json={"tokens": out["prompt_token_ids"]}).json()["prompt"]


def test_chat_template_flags(https):
    """--default-chat-template-kwargs under the request's own; --trust-request-chat-template
    makes a request's chat_template the one rendered."""
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 1, "return_token_ids": True}
    out = https.post("/v1/chat/completions", json=body).json()
    assert _prompt_text(https, out).startswith("[hello]user: Say hi")
    out = https.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"greeting": "yo"}}).json()
    assert _prompt_text(https, out).startswith("[yo]user")
    tokens = https.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert https.post("/detokenize", json={"tokens": tokens}).json()["prompt"].startswith("[hello]")
    own = "{{ greeting }}|{% for m in messages %}{{ m.content }}{% endfor %}|"
    out = https.post("/v1/chat/completions", json={**body, "chat_template": own}).json()
    assert _prompt_text(https, out) == "hello|Say hi|"
    # vLLM's documents (RAG) reach the template
    docs_template = "{% for d in documents %}<{{ d.title }}: {{ d.text }}>{% endfor %}{{ messages[0].content }}"
    docs = [{"title": "a", "text": "Paris"}, {"title": "b", "text": "Rome"}]
    out = https.post("/v1/chat/completions", json={**body, "chat_template": docs_template, "documents": docs}).json()
    assert _prompt_text(https, out) == "<a: Paris><b: Rome>Say hi"
    r = https.post("/v1/chat/completions", json={**body, "documents": ["not an object"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents"


def test_response_role_and_token_ids(https):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "temperature": 0, "logprobs": True,
            "return_token_ids": True}
    out = https.post("/v1/chat/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["message"]["role"] == "helper"
    assert [c["token"] for c in choice["logprobs"]["content"]] == [f"token_id:{t}" for t in choice["token_ids"]]
    mine = https.post("/v1/chat/completions", json={**body, "return_tokens_as_token_ids": False}).json()
    assert not mine["choices"][0]["logprobs"]["content"][0]["token"].startswith("token_id:")
    cont = https.post("/v1/chat/completions", json={**body, "add_generation_prompt": False}).json()
    assert cont["choices"][0]["message"]["role"] == "user"  # vLLM's: the last message's role
    with https.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        first = json.loads(next(line for line in r.iter_lines() if line.startswith("data: "))[6:])
    assert first["choices"][0]["delta"]["role"] == "helper"
    cmpl = https.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "logprobs": 1}).json()
    assert all(t.startswith("token_id:") for t in cmpl["choices"][0]["logprobs"]["tokens"])


def test_request_chat_template_refused_without_the_flag(http):
    """The shared server has no --trust-request-chat-template: the 400 says which flag allows it."""
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "chat_template": "{{ x }}"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "chat_template" and "--trust-request-chat-template" in err["message"]


def test_usage_flags(https, http):
    """--enable-prompt-tokens-details: usage says how many prompt tokens the prefix cache served
    (none the first time, the whole blocks the second); --enable-force-include-usage: a stream
    ends with usage though the request did not ask. Without the flags (the shared server) neither."""
    prompt = "Count slowly from one to twenty, one number per line, and then say done. " * 2
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    first = https.post("/v1/completions", json=body).json()["usage"]
    again = https.post("/v1/completions", json=body).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["prompt_tokens_details"]["cached_tokens"] == first["prompt_tokens"] // 16 * 16 > 0
    chat = https.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 1}).json()
    assert "cached_tokens" in chat["usage"]["prompt_tokens_details"]
    with https.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2
    plain = http.post("/v1/completions", json=body).json()["usage"]
    assert set(plain) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert all("usage" not in json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))


def test_several_api_keys(tmp_path):
    """vLLM's --api-key K1 K2: any of them is accepted (the edge middleware; no engine needed);
    a word after them that names a file, or reads as a repo id with no MODEL given, is refused
    (MODEL put after --api-key)."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from tessellm.entrypoints.cli import build_parser
    from tessellm.entrypoints.openai.api_server import add_error_handling
    from tessellm.entrypoints.openai.lifecycle import Lifecycle
    from tessellm.entrypoints.serve import _server_config

    config = _server_config(build_parser().parse_args(["serve", "--api-key", "k1", "k2"]))
    assert (config.api_key, config.extra_api_keys) == ("k1", ("k2",))
    app = FastAPI()
    app.get("/v1/x")(lambda: {"ok": True})
    add_error_handling(app, config, Lifecycle())
    with TestClient(app) as client:
        for key, status in (("k1", 200), ("k2", 200), ("k3", 401), (None, 401)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert client.get("/v1/x", headers=headers).status_code == status, key
    with pytest.raises(ValueError, match="put MODEL before --api-key"):
        _server_config(build_parser().parse_args(["serve", "--api-key", "k1", str(tmp_path)]))
    # a repo id (not a file here) after the keys, no MODEL: not served as the bundled model
    with pytest.raises(ValueError, match="reads as a model's repo id; put MODEL before --api-key"):
        _server_config(build_parser().parse_args(["serve", "--api-key", "k1", "meta-llama/Llama-3.1-8B"]))
    config = _server_config(build_parser().parse_args(["serve", "org/model", "--api-key", "k1", "a/b"]))
    assert config.extra_api_keys == ("a/b",)  # MODEL given: a key may have any shape


def test_request_logging(tls_server, https):
    """--enable-log-requests / --enable-log-outputs: a line per request received and per request
    finished (streamed too), prompt and output cut to --max-log-len (12) characters and ids."""
    body = {"model": MODEL, "prompt": "Zebra " * 20, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    out = https.post("/v1/completions", json=body).json()
    with https.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        r.read()
    deadline = time.monotonic() + 10
    while True:
        lines = tls_server.log_tail(400).splitlines()
        received = [line for line in lines if "Received request" in line and "prompt: 'Zebra Zebra '," in line]
        ids = [line.split("Received request ", 1)[1].split(":", 1)[0] for line in received]
        generated = [line for line in lines for rid in ids if f"Generated response {rid} " in line]
        if len(generated) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(received) == 2 and "temperature=0" in received[0], lines[-20:]
    assert len(received[0].split("prompt_token_ids: [", 1)[1].split("]", 1)[0].split(", ")) == 12
    assert len(generated) == 2, lines[-20:]
    assert repr(out["choices"][0]["text"][:12]) in generated[0] and "finish_reason: length" in generated[0]


def test_uds(tmp_path):
    """vLLM's --uds: the server's socket is a Unix domain socket (bind_uds, as run_serve binds
    it), served by uvicorn; a stale socket file is replaced, another file is refused; the file is
    open to any local user (as uvicorn's own --uds makes it) and goes with the listener."""
    import threading

    import uvicorn
    from fastapi import FastAPI

    from tessellm.entrypoints.cli import build_parser
    import stat

    from tessellm.entrypoints.serve import _close_listener, bind_uds

    path = str(tmp_path / "s.sock")
    assert build_parser().parse_args(["serve", "--uds", path]).uds == path
    bind_uds(path).close()  # leaves a stale socket file behind
    sock = bind_uds(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    app = FastAPI()
    app.get("/ping")(lambda: {"ok": True})
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://tessellm") as c:
            assert c.get("/ping").json() == {"ok": True}
    finally:
        server.should_exit = True
        thread.join(10)
        _close_listener(sock, path)
    assert not os.path.exists(path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="not a socket"):
        bind_uds(str(tmp_path / "file"))
