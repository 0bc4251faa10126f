"""``--reasoning-parser`` end to end: a real server on a tiny bigram "thinking" model
(``thinking_model.py``) whose greedy output is known token for token, so each case checks the
exact split of thinking and answer, whole and streamed (the stream's pieces reassemble to the
same two strings), for both parsers, single-token and two-token markers, with tools and with
structured output after the thinking."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.server.conftest import _launcher
from tests.server.thinking_model import CHAINS, FILLER, TOOL_IN_THOUGHT, make_thinking_model

pytest.importorskip("xgrammar")

ANSWER = " It is four."
# Qwen3.5's way of calling a tool from its thinking: <tool_call> (one token) without </think>
QWEN_CALL = '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
QWEN_CHAINS = {**CHAINS, "[call]": [" Let me check.", "<tool_call>", QWEN_CALL, "</tool_call>", "</s>"]}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("thinking")
    return {"single": make_thinking_model(str(root / "single")),
            "split": make_thinking_model(str(root / "split"), split_markers=True),
            "special": make_thinking_model(str(root / "special"), special_markers=True),
            "qwen": make_thinking_model(str(root / "qwen"), chains=QWEN_CHAINS)}


@pytest.fixture(scope="module")
def servers(server_factory, model_dirs):
    started = {}

    def get(parser: str, markers: str = "single"):
        key = (parser, markers)
        if key not in started:
            started[key] = server_factory([model_dirs[markers], "--served-model-name", "m",
                                           "--reasoning-parser", parser, "--tool-call-parser", "hermes"])
        return started[key]
    return get


def _chat(srv, trigger: str, **body):
    body = {"model": "m", "messages": [{"role": "user", "content": trigger}], "max_tokens": 24,
            "temperature": 0, **body}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=srv.headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(srv, trigger: str, **body):
    """(reasoning, content, deltas, tool call pieces, finish reasons) from a streamed request."""
    body = {"model": "m", "messages": [{"role": "user", "content": trigger}], "max_tokens": 24,
            "temperature": 0, "stream": True, **body}
    deltas = []
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, headers=srv.headers,
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                deltas += [(c["index"], c["delta"], c.get("finish_reason")) for c in chunk["choices"]]
    return deltas


def _joined(deltas, key, index=0):
    parts = [d.get(key) for i, d, _ in deltas if i == index and d.get(key) is not None]
    return "".join(parts) if parts else None


def _check_stream_matches(srv, trigger, message, markers_split=True, **body):
    deltas = _stream(srv, trigger, **body)
    assert _joined(deltas, "reasoning") == message.get("reasoning")
    assert _joined(deltas, "reasoning_content") == message.get("reasoning_content")
    assert (_joined(deltas, "content") or None) == (message.get("content") or None)
    for _, d, _ in deltas:  # no marker ever leaks into either field
        for key in ("reasoning", "content") if markers_split else ():
            assert "think>" not in (d.get(key) or "") and "</" != (d.get(key) or "")[-2:]
    return deltas


@pytest.mark.parametrize("markers", ["single", "split", "special"])
def test_deepseek_r1_splits_thinking_from_the_answer(servers, markers):
    srv = servers("deepseek_r1", markers)
    r = _chat(srv, "[think]")
    m = r["choices"][0]["message"]
    assert m["reasoning"] == m["reasoning_content"] == " Let me see. Two and two."
    assert m["content"] == ANSWER
    _check_stream_matches(srv, "[think]", m)  # deltas may coalesce: test_reasoning_split feeds one token at a time
    # The opening marker may be missing (DeepSeek-R1's template opens the block in the prompt).
    m = _chat(srv, "[bare]")["choices"][0]["message"]
    assert (m["reasoning"], m["content"]) == (" I recall", ANSWER)
    _check_stream_matches(srv, "[bare]", m)
    # No end marker: all of it is reasoning, no content.
    r = _chat(srv, "[noend]", max_tokens=7)
    m = r["choices"][0]["message"]
    assert m["reasoning"] == " Step by step Step by step Step" and m.get("content") is None
    assert r["choices"][0]["finish_reason"] == "length"
    _check_stream_matches(srv, "[noend]", m, max_tokens=7)
    _enable_thinking_false_is_all_answer(srv)


def test_qwen3_thinks_from_the_first_token_unless_enable_thinking_is_false(servers):
    """vLLM's current qwen3: a model that writes <think> and one whose template wrote it (the
    output opens inside the thinking) split alike; no </think>: all thinking; <tool_call> ends
    the thinking and is a call; enable_thinking false: all answer."""
    srv = servers("qwen3", "qwen")
    m = _chat(srv, "[think]")["choices"][0]["message"]
    assert (m["reasoning"], m["content"]) == (" Let me see. Two and two.", ANSWER)
    _check_stream_matches(srv, "[think]", m)
    m = _chat(srv, "[bare]")["choices"][0]["message"]
    assert (m["reasoning"], m["content"]) == (" I recall", ANSWER)
    _check_stream_matches(srv, "[bare]", m)
    m = _chat(srv, "[noend]", max_tokens=7)["choices"][0]["message"]
    assert (m["reasoning"], m.get("content")) == (" Step by step Step by step Step", None)
    _check_stream_matches(srv, "[noend]", m, max_tokens=7)
    # "<tool_call>" inside one token of other text is not the marker: still thinking
    m = _chat(srv, "[tool]")["choices"][0]["message"]
    assert (m["reasoning"], m["content"]) == (" Maybe" + TOOL_IN_THOUGHT + " No, later.", ANSWER)
    body = {"tools": [WEATHER], "tool_choice": "auto"}
    choice = _chat(srv, "[call]", **body)["choices"][0]
    m = choice["message"]
    assert m["reasoning"] == " Let me check." and not m.get("content")
    assert choice["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in m["tool_calls"]] == [
        ("get_weather", {"city": "Paris"})]
    deltas = _check_stream_matches(srv, "[call]", m, **body)
    pieces = [tc for _, d, _ in deltas for tc in d.get("tool_calls") or []]
    assert json.loads("".join(p["function"].get("arguments") or "" for p in pieces)) == {"city": "Paris"}
    assert [f for _, _, f in deltas if f] == ["tool_calls"]
    _enable_thinking_false_is_all_answer(srv)


def _enable_thinking_false_is_all_answer(srv):
    """The template closes an empty think block in the prompt ("...<think></think>"): the output
    (no marker in it) is all answer, for deepseek_r1 too, which would otherwise call it reasoning."""
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    m = _chat(srv, "[json]", **off)["choices"][0]["message"]
    assert "reasoning" not in m and m["content"] == ANSWER
    _check_stream_matches(srv, "[json]", m, **off)


def test_include_reasoning_false_and_n_greater_than_one(servers):
    srv = servers("deepseek_r1")
    r = _chat(srv, "[think]", include_reasoning=False)
    full = _chat(srv, "[think]")
    m = r["choices"][0]["message"]
    assert "reasoning" not in m and "reasoning_content" not in m and m["content"] == ANSWER
    assert r["usage"] == full["usage"]  # the thinking tokens still count
    deltas = _stream(srv, "[think]", include_reasoning=False)
    assert _joined(deltas, "reasoning") is None and _joined(deltas, "content") == ANSWER
    r = _chat(srv, "[think]", n=2)
    assert [c["message"]["reasoning"] for c in r["choices"]] == [" Let me see. Two and two."] * 2
    deltas = _stream(srv, "[think]", n=2)
    for i in (0, 1):
        assert _joined(deltas, "reasoning", i) == " Let me see. Two and two."
        assert _joined(deltas, "content", i) == ANSWER


HERMES_CALL = ('root ::= "<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"" '
               '[A-Z] [a-z]{1,8} "\\"}}\\n</tool_call>"')
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tool_calls_come_from_the_answer_only(servers):
    """A <tool_call> written while thinking is not a call; the one after </think> (forced by a
    grammar that applies after the thinking) is."""
    srv = servers("deepseek_r1")
    body = {"tools": [WEATHER], "tool_choice": "auto", "max_tokens": 120,
            "structured_outputs": {"grammar": HERMES_CALL}}
    r = _chat(srv, "[tool]", **body)
    choice = r["choices"][0]
    m = choice["message"]
    assert m["reasoning"] == " Maybe" + TOOL_IN_THOUGHT + " No, later."
    assert choice["finish_reason"] == "tool_calls" and len(m["tool_calls"]) == 1
    args = json.loads(m["tool_calls"][0]["function"]["arguments"])
    assert args["city"] != "Rome" and args["city"][0].isupper()
    assert not m.get("content")
    deltas = _stream(srv, "[tool]", **body)
    assert _joined(deltas, "reasoning") == m["reasoning"]
    pieces = [tc for _, d, _ in deltas for tc in d.get("tool_calls") or []]
    assert pieces and pieces[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(p["function"].get("arguments") or "" for p in pieces)) == args
    assert [f for _, _, f in deltas if f] == ["tool_calls"]


PARIS = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris"]}}, "required": ["city"],
    "additionalProperties": False}}}


@pytest.mark.parametrize("choice,finish", [
    ("required", "tool_calls"), ({"type": "function", "function": {"name": "get_weather"}}, "stop")])
def test_forced_tool_choice_after_a_tool_call_that_ended_the_thinking(servers, choice, finish):
    """qwen3: a model that writes <tool_call> while thinking ends its thinking there, and a
    forced tool_choice's grammar starts after that marker: the answer is "<tool_call>" then the
    forced JSON, which is still the call (it was content, or arguments starting "<tool_call>")."""
    srv = servers("qwen3", "qwen")
    body = {"tools": [PARIS], "tool_choice": choice, "max_tokens": 120, "parallel_tool_calls": False,
            "structured_outputs": {"disable_any_whitespace": True}}  # one call, compact: it ends
    out = _chat(srv, "[call]", **body)["choices"][0]
    m = out["message"]
    assert m["reasoning"] == " Let me check." and not m.get("content")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in m["tool_calls"]] == [
        ("get_weather", {"city": "Paris"})]
    assert out["finish_reason"] == finish
    deltas = _check_stream_matches(srv, "[call]", m, **body)
    pieces = [tc for _, d, _ in deltas for tc in d.get("tool_calls") or []]
    assert pieces[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(p["function"].get("arguments") or "" for p in pieces)) == {"city": "Paris"}
    assert [f for _, _, f in deltas if f] == [finish]


def test_named_tool_choice_cut_off_while_thinking_calls_nothing(servers):
    """The output ends (max_tokens) before the thinking does: no call, no content, as vLLM's
    parser now answers (it returned the named call with "" arguments before), whole and
    streamed; the finish reason stays "length"."""
    srv = servers("qwen3", "qwen")
    body = {"tools": [PARIS], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": 7}
    out = _chat(srv, "[noend]", **body)["choices"][0]
    m = out["message"]
    assert m["reasoning"] == " Step by step Step by step Step"
    assert (m.get("content"), m.get("tool_calls") or []) == (None, [])
    assert out["finish_reason"] == "length"
    deltas = _check_stream_matches(srv, "[noend]", m, **body)
    assert not [tc for _, d, _ in deltas for tc in d.get("tool_calls") or []]
    assert [f for _, _, f in deltas if f] == ["length"]


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}


@pytest.mark.parametrize("parser,trigger,thinking", [
    ("deepseek_r1", "[json]", " Think: {not json"),
    ("qwen3", "[think]", " Let me see. Two and two.")])
def test_json_schema_applies_after_the_thinking(servers, parser, trigger, thinking):
    """The thinking is free text the schema would refuse; the answer (which the model alone
    would have written as " It is four.") parses and matches the schema."""
    jsonschema = pytest.importorskip("jsonschema")
    srv = servers(parser, "qwen" if parser == "qwen3" else "single")
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    compact = {"disable_any_whitespace": True}  # a free-whitespace loop is what this model would write
    r = _chat(srv, trigger, response_format=fmt, structured_outputs=compact, max_tokens=40)
    m = r["choices"][0]["message"]
    assert m["reasoning"] == thinking
    jsonschema.validate(json.loads(m["content"]), SCHEMA)
    assert r["choices"][0]["finish_reason"] == "stop"
    _check_stream_matches(srv, trigger, m, response_format=fmt, structured_outputs=compact, max_tokens=40)
    # enable_thinking false: the prompt closed the block, so the engine constrains from the first
    # token (deepseek_r1 would otherwise wait for a </think> that never comes: no JSON at all).
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    m = _chat(srv, trigger, response_format=fmt, structured_outputs=compact, max_tokens=40, **off)
    m = m["choices"][0]["message"]
    assert "reasoning" not in m
    jsonschema.validate(json.loads(m["content"]), SCHEMA)


def test_unknown_reasoning_parser_is_refused_at_startup():
    proc = subprocess.run([*_launcher(), "--reasoning-parser", "nope"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "deepseek_r1" in proc.stderr and "qwen3" in proc.stderr


def test_a_response_message_sent_back_keeps_its_thinking_for_the_template(servers):
    """Clients append the assistant message as they got it (with reasoning and
    reasoning_content) to the next request; the template sees the thinking as
    reasoning_content (Qwen3's and DeepSeek's templates read it)."""
    srv = servers("deepseek_r1")
    first = _chat(srv, "[think]")["choices"][0]["message"]
    history = [{"role": "user", "content": "[think]"}, first, {"role": "user", "content": "[bare]"}]
    m = _chat(srv, "", messages=history)["choices"][0]["message"]
    assert (m["reasoning"], m["content"]) == (" I recall", ANSWER)
    for key in ("reasoning", "reasoning_content"):  # either name alone
        turn = {"role": "assistant", "content": ANSWER, key: " Let me see."}
        r = httpx.post(f"{srv.url}/tokenize", headers=srv.headers, timeout=60,
                       json={"model": "m", "messages": [{"role": "user", "content": "[think]"}, turn]})
        assert r.status_code == 200, r.text
        text = httpx.post(f"{srv.url}/detokenize", headers=srv.headers, timeout=60,
                          json={"model": "m", "tokens": r.json()["tokens"]}).json()["prompt"]
        assert text == "[think]<think> Let me see.</think>" + ANSWER


def test_thinking_token_budget_cuts_the_reasoning_whole_and_streamed(servers):
    """``thinking_token_budget``: "<think>[long]" opens the block in the prompt (its "[long]" is
    the first thinking token) and would think 40 tokens; the budget forces ``</think>`` after N
    and the model answers. Streamed as whole; -1 is no budget; two-token markers alike."""
    free = "".join(FILLER)
    for markers in ("single", "split"):
        srv = servers("deepseek_r1", markers)
        for budget, reasoning in ((5, "".join(FILLER[:4])), (0, ""), (-1, free), (None, free)):
            body = {"max_tokens": 60} if budget is None else {"max_tokens": 60, "thinking_token_budget": budget}
            m = _chat(srv, "<think>[long]", **body)["choices"][0]["message"]
            assert (m["reasoning"] or "", m["content"]) == (reasoning, ANSWER), (markers, budget)
            if reasoning:
                _check_stream_matches(srv, "<think>[long]", m, **body)
            else:  # an empty thinking: the whole response says "", the stream sends no reasoning delta
                deltas = _stream(srv, "<think>[long]", **body)
                assert (_joined(deltas, "reasoning"), _joined(deltas, "content")) == (None, ANSWER)
    srv = servers("deepseek_r1")
    r = httpx.post(f"{srv.url}/v1/completions", headers=srv.headers, timeout=120, json={
        "model": "m", "prompt": "<think>[long]", "max_tokens": 60, "temperature": 0, "thinking_token_budget": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "".join(FILLER[:2]) + "</think>" + ANSWER
    r = httpx.post(f"{srv.url}/v1/chat/completions", headers=srv.headers, timeout=120, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "thinking_token_budget": -2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "thinking_token_budget", r.text
    r = httpx.post(f"{srv.url}/v1/chat/completions", headers=srv.headers, timeout=120, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "thinking_token_budget": 2 ** 64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "thinking_token_budget", r.text  # was a 500


def test_thinking_token_budget_without_reasoning_markers_is_a_400(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 4, "thinking_token_budget": 8})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "thinking_token_budget" and "--reasoning-parser" in error["message"]
    assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 4, "thinking_token_budget": -1}).status_code == 200
