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

from tests.server.test_api_combos import CHAT, MODEL, PROMPT, _events


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
                    # every 500 is vLLM's InternalServerError object, as a failed generation's
                    assert (err["type"], err["code"], err["param"]) == ("InternalServerError", 500, None)
                    assert "RuntimeError: kaput" in err["message"]
    finally:
        server.should_exit = True


# -- the sweep of vLLM's request fields ---------------------------------------------------------

_REFUSED = [  # vLLM extras tessellm does not implement: (field, neutral value, a value that acts)
    ("length_penalty", 1.0, 0.5),  # without use_beam_search (tests/server/test_beam_search_server.py)
    ("spaces_between_special_tokens", True, False),
    ("logits_processors", None, ["my.Processor"]), ("guided_whitespace_pattern", None, " *"),
    ("structural_tag", None, "{}"),
]
_FIXES = {"logits_processors": "logit_bias", "guided_whitespace_pattern": "disable_any_whitespace",
          "structural_tag": "response_format"}  # the refusal says what to send instead
_CHAT_REFUSED = [("chat_template", None, "{{ messages }}")]


@pytest.mark.parametrize("path,body,fields", [
    ("/v1/completions", {"prompt": PROMPT}, _REFUSED),
    ("/v1/chat/completions", {"messages": CHAT}, _REFUSED + _CHAT_REFUSED),
])
def test_vllm_extras_neutral_accepted_else_refused_by_name(http, path, body, fields):
    """A vLLM client sends these fields at their defaults (some SDK wrappers always do): accepted
    (was a 400 'unrecognized'); a value that would change the output is a 400 naming the field,
    never silently ignored."""
    body = {"model": MODEL, **body, "max_tokens": 1, "temperature": 0}
    neutral = {name: value for name, value, _ in fields}
    r = http.post(path, json={**body, **neutral, "session_id": "s", "stream_interval": 2})
    assert r.status_code == 200, r.text
    for name, _, used in fields:
        r = http.post(path, json={**body, name: used})
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert err["param"] == name and err["code"] == "unsupported_parameter" and name in err["message"]
        assert _FIXES.get(name, "") in err["message"], err


def test_chat_echo_puts_the_continued_message_first(http):
    """vLLM's chat ``echo``: with the reply continuing the last (assistant) message, its text
    comes before the generated text, in the response and as the stream's first content delta;
    with a new assistant turn (the last message is the user's) nothing is echoed."""
    partial = "Hi! My name is"
    body = {"model": MODEL, "messages": CHAT + [{"role": "assistant", "content": partial}], "max_tokens": 5,
            "temperature": 0, "ignore_eos": True, "add_generation_prompt": False, "continue_final_message": True}
    plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    echoed = http.post("/v1/chat/completions", json={**body, "echo": True}).json()["choices"][0]["message"]
    assert echoed["content"] == partial + plain and echoed["role"] == "assistant"
    deltas = [e["choices"][0]["delta"].get("content") for e in _events(http, "/v1/chat/completions",
                                                                        {**body, "echo": True})]
    assert deltas[:2] == ["", partial] and "".join(d or "" for d in deltas) == partial + plain
    fresh = {"model": MODEL, "messages": CHAT, "max_tokens": 3, "temperature": 0}
    assert (http.post("/v1/chat/completions", json={**fresh, "echo": True}).json()["choices"][0]["message"]
            == http.post("/v1/chat/completions", json=fresh).json()["choices"][0]["message"])


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": PROMPT}),
                                       ("/v1/chat/completions", {"messages": CHAT})])
def test_stop_reason(http, path, body):
    """vLLM's choice field stop_reason: the stop token id or stop string that ended the choice,
    None at EOS or length; streamed on the chunk with the finish_reason."""
    body = {"model": MODEL, **body, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    free = http.post(path, json=body).json()["choices"][0]
    assert free["finish_reason"] == "length" and free["stop_reason"] is None
    tid = free["token_ids"][2]
    by_id = http.post(path, json={**body, "stop_token_ids": [tid]}).json()["choices"][0]
    assert by_id["finish_reason"] == "stop" and by_id["stop_reason"] == tid
    text = free.get("text", (free.get("message") or {}).get("content"))
    stop = text.strip()[-2:]
    by_str = http.post(path, json={**body, "stop": [stop]}).json()["choices"][0]
    assert by_str["finish_reason"] == "stop" and by_str["stop_reason"] == stop
    *_, last = [e for e in _events(http, path, {**body, "stop_token_ids": [tid]}) if e["choices"]]
    assert last["choices"][0]["finish_reason"] == "stop" and last["choices"][0]["stop_reason"] == tid


def test_return_token_ids_completions(http):
    """vLLM's return_token_ids: prompt_token_ids and token_ids in the choice (streamed: the prompt's
    on the first chunk, then each chunk's new ids); absent when not asked."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    ids = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    choice = http.post("/v1/completions", json={**body, "return_token_ids": True}).json()["choices"][0]
    assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == 5
    assert http.post("/detokenize", json={"tokens": choice["token_ids"]}).json()["prompt"] == choice["text"]
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    assert "token_ids" not in plain and "prompt_token_ids" not in plain
    chunks = [e["choices"][0] for e in _events(http, "/v1/completions", {**body, "return_token_ids": True})]
    assert chunks[0]["prompt_token_ids"] == ids and all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c["token_ids"]] == choice["token_ids"]


def test_return_token_ids_chat(http):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    ids = http.post("/tokenize", json={"model": MODEL, "messages": CHAT}).json()["tokens"]
    out = http.post("/v1/chat/completions", json=body).json()
    assert out["prompt_token_ids"] == ids and len(out["choices"][0]["token_ids"]) == 5
    events = _events(http, "/v1/chat/completions", body)
    assert events[0]["prompt_token_ids"] == ids and all("prompt_token_ids" not in e for e in events[1:])
    assert [t for e in events for t in e["choices"][0].get("token_ids", [])] == out["choices"][0]["token_ids"]


def test_return_tokens_as_token_ids(http):
    """vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:{id}" (for tokens that are
    not whole characters), at both endpoints."""
    body = {"model": MODEL, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "return_tokens_as_token_ids": True}
    choice = http.post("/v1/completions", json={**body, "prompt": PROMPT, "logprobs": 2}).json()["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    for top in choice["logprobs"]["top_logprobs"]:
        assert top and all(k.startswith("token_id:") and k[9:].isdigit() for k in top)
    chat = http.post("/v1/chat/completions", json={**body, "messages": CHAT, "logprobs": True,
                                                   "top_logprobs": 2}).json()["choices"][0]
    content = chat["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{t}" for t in chat["token_ids"]]
    assert all(t["token"].startswith("token_id:") for c in content for t in c["top_logprobs"])


def test_truncate_prompt_tokens(http):
    """vLLM's truncate_prompt_tokens: a prompt over the context (1024 here) is cut to its last N
    tokens (truncation_side "right": its first N) and answered as that shorter prompt."""
    long = "hello there " * 700  # ~1400 tokens
    ids = http.post("/tokenize", json={"model": MODEL, "prompt": long}).json()["tokens"]
    assert len(ids) > 1024
    body = {"model": MODEL, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    for side, want in ((None, ids[-10:]), ("left", ids[-10:]), ("right", ids[:10])):
        extra = {"truncate_prompt_tokens": 10, **({"truncation_side": side} if side else {})}
        out = http.post("/v1/completions", json={**body, "prompt": long, **extra}).json()
        assert out["usage"]["prompt_tokens"] == 10 and out["choices"][0]["prompt_token_ids"] == want
        same = http.post("/v1/completions", json={**body, "prompt": want}).json()
        assert out["choices"][0]["token_ids"] == same["choices"][0]["token_ids"]
    whole = {**body, "prompt": ids, "truncate_prompt_tokens": -1, "max_tokens": 1}
    out = http.post("/v1/completions", json=whole).json()
    assert out["usage"]["prompt_tokens"] == 1024 - 1  # -1: the context less max_tokens, as vLLM's server
    out = http.post("/v1/completions", json={**whole, "max_tokens": 3}).json()
    assert out["usage"]["prompt_tokens"] == 1024 - 3 and out["usage"]["completion_tokens"] == 3
    assert out["choices"][0]["prompt_token_ids"] == ids[-(1024 - 3):]
    r = http.post("/v1/completions", json={**whole, "max_tokens": 3, "truncate_prompt_tokens": 1022})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", r.text
    chat = http.post("/v1/chat/completions", json={**body, "messages": CHAT, "truncate_prompt_tokens": 4}).json()
    full = http.post("/tokenize", json={"model": MODEL, "messages": CHAT}).json()["tokens"]
    assert chat["prompt_token_ids"] == full[-4:]
    for bad in ({"truncate_prompt_tokens": 2000}, {"truncation_side": "left"}):
        r = http.post("/v1/completions", json={**body, "prompt": PROMPT, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad)), r.text
    for path, prompt in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": CHAT})):
        r = http.post(path, json={**body, **prompt, "truncate_prompt_tokens": 0})  # would empty the prompt
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "truncate_prompt_tokens" and "got 0" in r.json()["error"]["message"]


def test_request_id_names_the_response(http):
    """vLLM's request_id: the response id is cmpl-{request_id} / chatcmpl-{request_id}; two
    requests may share one (the engine's own ids stay unique)."""
    body = {"model": MODEL, "max_tokens": 2, "request_id": "job-7"}
    assert http.post("/v1/completions", json={**body, "prompt": PROMPT}).json()["id"] == "cmpl-job-7"
    assert http.post("/v1/chat/completions", json={**body, "messages": CHAT}).json()["id"] == "chatcmpl-job-7"
    events = _events(http, "/v1/completions", {**body, "prompt": [PROMPT, PROMPT]})
    assert {e["id"] for e in events} == {"cmpl-job-7"}


def test_response_format_at_completions(http):
    """vLLM takes response_format at /v1/completions too (was a 400 'unrecognized')."""
    schema = {"type": "string", "enum": ["yes", "no"]}
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Is water wet? Answer:", "max_tokens": 8,
                                           "response_format": {"type": "json_schema",
                                                               "json_schema": {"name": "a", "schema": schema}}})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["text"]) in ("yes", "no")


def test_ping(server):
    """vLLM's /ping (GET and POST): liveness like /health, no API key needed."""
    for method in ("GET", "POST"):
        assert httpx.request(method, f"{server.url}/ping", timeout=30).status_code == 200


def test_text_parts_join_with_newlines(http):
    """A message's text content parts are joined with "\\n", as vLLM renders them (they were run
    together: a different prompt than vLLM's for the same request)."""
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]
    joined = http.post("/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "Say\nhi"}]})
    split = http.post("/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": parts}]})
    assert split.json()["tokens"] == joined.json()["tokens"]
    out = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 1, "return_token_ids": True,
                                                  "messages": [{"role": "user", "content": parts}]}).json()
    assert out["prompt_token_ids"] == joined.json()["tokens"]


def test_temperature_over_two(http):
    """Current vLLM refuses a temperature above 2 (older vLLM sampled at it, and so did tessellm):
    a 400 naming temperature. One below 0.01 is raised to 0.01 and answered."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "seed": 1}
    r = http.post("/v1/completions", json={**body, "temperature": 3.0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text
    assert "temperature must be in [0, 2]" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={**body, "temperature": 0.001})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


def test_tokenize_chat_with_tools(tools_server):
    """vLLM's /tokenize takes tools (chat form), rendered by the template as a chat request's are,
    so a client can count a tool-using prompt's tokens (was a 400 'unrecognized'). A server whose
    chat template shows the tools (conftest's ``tools_server``; the bundled model's does not)."""
    srv = tools_server
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    body = {"model": MODEL, "messages": CHAT}
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=120) as http:
        plain = http.post("/tokenize", json=body).json()["tokens"]
        r = http.post("/tokenize", json={**body, "tools": tools})
        assert r.status_code == 200, r.text
        chat = http.post("/v1/chat/completions", json={**body, "tools": tools, "tool_choice": "required",
                                                       "max_tokens": 1, "return_token_ids": True}).json()
        shown = http.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert r.json()["tokens"] == chat["prompt_token_ids"] != plain
    assert shown.startswith("Tools: get_weather")


def test_no_tool_calls_key_without_calls(http):
    """OpenAI and vLLM leave tool_calls out of a message that calls nothing (it was "tool_calls": [],
    which clients testing for the key read as a tool call)."""
    out = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2}).json()
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert "tool_calls" not in message


@pytest.mark.parametrize("path,key", [("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")])
def test_truncation_of_a_text_far_over_the_context(http, path, key):
    """A text so long it is refused untokenized (sure to exceed the context) is tokenized and cut
    when the request asks for truncate_prompt_tokens (the chat form was still refused)."""
    text = "hello there " * 60000  # 720000 characters: refused before tokenizing
    value = text if key == "prompt" else [{"role": "user", "content": text}]
    body = {"model": MODEL, key: value, "max_tokens": 1}
    assert http.post(path, json=body).json()["error"]["code"] == "context_length_exceeded"
    r = http.post(path, json={**body, "truncate_prompt_tokens": 16})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 16, r.text


def test_logprobs_of_masked_tokens_are_numbers(http):
    """A grammar masks tokens to -inf, and JSON has no -inf: they went out as "logprob": null, which
    breaks a client doing arithmetic on them; vLLM sends -9999.0, so do we (both endpoints)."""
    common = {"model": MODEL, "max_tokens": 3, "temperature": 0, "guided_choice": ["yes"]}
    chat = http.post("/v1/chat/completions", json={**common, "messages": CHAT, "logprobs": True,
                                                   "top_logprobs": 5}).json()
    values = [t["logprob"] for c in chat["choices"][0]["logprobs"]["content"] for t in [c, *c["top_logprobs"]]]
    cmpl = http.post("/v1/completions", json={**common, "prompt": PROMPT, "logprobs": 5}).json()
    lp = cmpl["choices"][0]["logprobs"]
    values += lp["token_logprobs"] + [v for top in lp["top_logprobs"] for v in top.values()]
    assert all(isinstance(v, float) and -9999.0 <= v <= 0 for v in values), values
    assert -9999.0 in values  # the masked ones (only "yes" may be generated)


def test_invocations_and_load(server, http):
    """vLLM's /invocations (SageMaker's one route): the body's shape picks chat or completion, and
    the answer is that endpoint's; /load (no key) counts the requests in flight."""
    chat = http.post("/invocations", json={"model": MODEL, "messages": CHAT, "max_tokens": 2, "temperature": 0,
                                           "return_token_ids": True}).json()
    same = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2,
                                                   "temperature": 0, "return_token_ids": True}).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["token_ids"] == same["choices"][0]["token_ids"]
    cmpl = http.post("/invocations", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2}).json()
    assert cmpl["object"] == "text_completion" and cmpl["usage"]["completion_tokens"] == 2
    r = http.post("/invocations", json={"model": MODEL, "max_tokens": 2})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    assert http.post("/invocations", json={"model": MODEL, "messages": CHAT, "bogus": 1}).status_code == 400
    load = httpx.get(f"{server.url}/load", timeout=30)
    assert load.status_code == 200 and load.json()["server_load"] >= 0
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 900,
                                                      "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()  # held: a dropped iterator closes the response
        next(lines)  # the stream has begun
        assert httpx.get(f"{server.url}/load", timeout=30).json()["server_load"] >= 1
