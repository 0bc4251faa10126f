"""gpt-oss's harmony format end to end: a real server on a tiny bigram ``GptOssForCausalLM``
(``harmony_model.py``) whose greedy output is known token for token, started with no parser
flag (a gpt-oss checkpoint selects harmony by itself). Each case checks the exact split into
``reasoning`` / ``reasoning_content``, ``content`` and ``tool_calls``, whole and streamed (the
stream reassembles to the same message, and no marker leaks into a delta), ``<|call|>`` ending
generation with finish_reason "tool_calls", a call cut by max_tokens, ``reasoning_effort`` and
an earlier call, its thinking and its result rendered into the prompt, and bad requests
answered with 400."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.harmony_model import make_harmony_model

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CALL = {"name": "get_weather", "arguments": '{"city": "Paris"}'}


@pytest.fixture(scope="module")
def srv(server_factory, tmp_path_factory):
    path = make_harmony_model(str(tmp_path_factory.mktemp("harmony") / "m"))
    return server_factory([path, "--served-model-name", "m", "--max-model-len", "512"])


def _body(trigger, **body):
    return {"model": "m", "messages": [{"role": "user", "content": trigger}], "max_tokens": 16,
            "temperature": 0, **body}


def _chat(srv, trigger, **body):
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=_body(trigger, **body), headers=srv.headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(srv, trigger, **body):
    """The streamed choice reassembled: (message fields, tool calls, finish_reason, deltas)."""
    deltas, finish = [], None
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=_body(trigger, stream=True, **body),
                      headers=srv.headers, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for c in chunk["choices"]:
                    deltas.append(c["delta"])
                    finish = c.get("finish_reason") or finish
    fields = {}
    for key in ("reasoning", "reasoning_content", "content"):
        parts = [d[key] for d in deltas if d.get(key)]
        fields[key] = "".join(parts) if parts else None
    calls = {}
    for d in deltas:
        for piece in d.get("tool_calls") or []:
            call = calls.setdefault(piece["index"], {"name": None, "arguments": ""})
            call["name"] = piece["function"].get("name") or call["name"]
            call["arguments"] += piece["function"].get("arguments") or ""
    for d in deltas:
        for key in ("reasoning", "content"):
            assert "<|" not in (d.get(key) or ""), d  # no marker (nor a piece of one) leaks
    return fields, [calls[i] for i in sorted(calls)], finish


def _same_stream(srv, trigger, message, finish_reason, **body):
    fields, calls, finish = _stream(srv, trigger, **body)
    for key in ("reasoning", "reasoning_content", "content"):
        assert fields[key] == (message.get(key) or None), key
    assert calls == [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in message.get("tool_calls") or []]
    assert finish == finish_reason


def test_analysis_is_reasoning_and_final_is_content(srv):
    r = _chat(srv, "[final]")
    choice = r["choices"][0]
    m = choice["message"]
    assert m["reasoning"] == m["reasoning_content"] == " Two and two."
    assert m["content"] == "It is four." and not m.get("tool_calls")
    assert choice["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == 11  # through <|return|>
    _same_stream(srv, "[final]", m, "stop")


def test_commentary_call_is_a_tool_call_and_ends_the_turn(srv):
    r = _chat(srv, "[tool]", tools=TOOLS)
    choice = r["choices"][0]
    m = choice["message"]
    assert m["reasoning"] == " Need the weather." and m.get("content") is None
    assert [c["function"] for c in m["tool_calls"]] == [CALL]
    assert m["tool_calls"][0]["id"].startswith("call_") and m["tool_calls"][0]["type"] == "function"
    assert choice["finish_reason"] == "tool_calls"
    assert r["usage"]["completion_tokens"] == 6  # <|call|> stopped it (the model would go on)
    _same_stream(srv, "[tool]", m, "tool_calls", tools=TOOLS)


def test_call_cut_by_max_tokens(srv):
    r = _chat(srv, "[tool]", tools=TOOLS, max_tokens=4)
    choice = r["choices"][0]
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [{"name": "get_weather",
                                                                          "arguments": '{"city":'}]
    assert choice["finish_reason"] == "length"
    _same_stream(srv, "[tool]", choice["message"], "length", tools=TOOLS, max_tokens=4)


def test_structured_output_constrains_the_final_channel(srv):
    """The analysis is free; the grammar starts after <|channel|>final<|message|>, so the
    answer is the schema's, not the model's own "It is four."."""
    pytest.importorskip("xgrammar")
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "string", "enum": ["yes", "no"]}}}
    r = _chat(srv, "[final]", response_format=fmt)
    m = r["choices"][0]["message"]
    assert m["reasoning"] == " Two and two." and json.loads(m["content"]) in ("yes", "no")
    assert r["choices"][0]["finish_reason"] == "stop"


PARIS_ONLY = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris"]}}, "required": ["city"],
    "additionalProperties": False}}}]


@pytest.mark.parametrize("tool_choice, arguments, finish_reason", [
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Paris"}', "stop"),
    ("required", '{"city": "Paris"}', "tool_calls")])
def test_forced_tool_choice_constrains_the_final_channel(srv, tool_choice, arguments, finish_reason):
    """A named function or "required": the grammar starts after the final channel's header
    and that channel's text is read as the forced call (the model alone would answer "It is
    four."); the analysis before it stays free."""
    pytest.importorskip("xgrammar")
    body = dict(tools=PARIS_ONLY, tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=90,
                structured_outputs={"disable_any_whitespace": True})  # no free-whitespace loop
    r = _chat(srv, "[final]", **body)
    choice = r["choices"][0]
    m = choice["message"]
    assert m["reasoning"] == " Two and two." and m.get("content") is None
    assert [c["function"] for c in m["tool_calls"]] == [{"name": "get_weather", "arguments": arguments}]
    assert choice["finish_reason"] == finish_reason
    _same_stream(srv, "[final]", m, finish_reason, **body)


def test_a_tool_without_description_renders(srv):
    """gpt-oss's template writes "// " + description for each tool, which fails on a tool that
    has none (OpenAI makes it optional): the server gives it an empty one."""
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=_body("[tool]", tools=tools, return_token_ids=True),
                   headers=srv.headers, timeout=120)
    assert r.status_code == 200, r.text
    assert [c["function"] for c in r.json()["choices"][0]["message"]["tool_calls"]] == [CALL]


def test_tool_choice_none_returns_no_call(srv):
    r = _chat(srv, "[tool]", tools=TOOLS, tool_choice="none")
    m = r["choices"][0]["message"]
    assert not m.get("tool_calls") and m.get("content") is None
    assert m["reasoning"] == ' Need the weather.\n{"city": "Paris"}'
    assert r["choices"][0]["finish_reason"] == "stop"


def test_text_outside_the_format_is_content(srv):
    r = _chat(srv, "[plain]")
    m = r["choices"][0]["message"]
    assert m["content"] == "Just text without channels." and "reasoning" not in m
    _same_stream(srv, "[plain]", m, "stop")


def test_include_reasoning_false(srv):
    m = _chat(srv, "[final]", include_reasoning=False)["choices"][0]["message"]
    assert "reasoning" not in m and "reasoning_content" not in m and m["content"] == "It is four."


def test_effort_tools_and_an_earlier_call_reach_the_prompt(srv):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "reasoning": "Need the weather.",
                 "tool_calls": [{"id": "call_1", "type": "function", "function": CALL}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "[after_tool]"}]
    r = httpx.post(f"{srv.url}/v1/chat/completions", headers=srv.headers, timeout=120, json={
        "model": "m", "messages": messages, "tools": TOOLS, "reasoning_effort": "high", "max_tokens": 8,
        "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    r = r.json()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(srv_model_path(srv))
    prompt = tok.decode(r["prompt_token_ids"])
    assert prompt.startswith("<|start|>system<|message|>Reasoning: high<|end|>"
                             "<|start|>developer<|message|># Tools get_weather // Weather in a city.<|end|>")
    assert ("<|start|>assistant<|channel|>analysis<|message|>Need the weather.<|end|>"
            '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>'
            '{"city": "Paris"}<|call|>') in prompt
    assert prompt.endswith("<|message|>[after_tool]<|end|><|start|>assistant[after_tool]")
    m = r["choices"][0]["message"]
    assert m["content"] == "It is four." and "reasoning" not in m and r["choices"][0]["finish_reason"] == "stop"


def srv_model_path(srv):
    r = httpx.get(f"{srv.url}/v1/models", headers=srv.headers, timeout=30)
    return r.json()["data"][0]["root"]


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"tool_choice": "auto"}, "tool_choice"),  # no tools
])
def test_bad_requests_are_400(srv, body, param):
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=_body("[final]", **body), headers=srv.headers,
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and param in (error["param"] or "")
    assert _chat(srv, "[final]")["choices"][0]["message"]["content"] == "It is four."  # still serving


def test_n_choices_each_parsed_whole_and_streamed(srv):
    r = _chat(srv, "[tool]", tools=TOOLS, n=2, logprobs=True)
    assert [[c["function"] for c in ch["message"]["tool_calls"]] for ch in r["choices"]] == [[CALL], [CALL]]
    assert all(len(ch["logprobs"]["content"]) == 6 for ch in r["choices"])
    args, finish = {0: "", 1: ""}, {}
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=_body("[tool]", stream=True, tools=TOOLS, n=2),
                      headers=srv.headers, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    for piece in c["delta"].get("tool_calls") or []:
                        args[c["index"]] += piece["function"].get("arguments") or ""
                    finish[c["index"]] = c.get("finish_reason") or finish.get(c["index"])
    assert args == {0: CALL["arguments"], 1: CALL["arguments"]} and finish == {0: "tool_calls", 1: "tool_calls"}


def test_a_prompt_that_opens_the_first_header(srv):
    """A template whose generation prompt writes the first message's header
    (``<|start|>assistant<|channel|>final<|message|>``, as some gpt-oss templates do): the
    output starts inside that message. The model writes "It is four." either way; opened on
    analysis it is reasoning, on final it is content, and a constraint applies from the first
    token (the engine's gate sees the final header closed in the prompt)."""
    def opened(channel, **body):
        kwargs = {"open_header": f"<|channel|>{channel}<|message|>"}
        return _chat(srv, "[final]", chat_template_kwargs=kwargs, **body)["choices"][0]["message"], kwargs

    m, kwargs = opened("analysis")
    assert m["reasoning"] == "It is four." and m.get("content") is None
    _same_stream(srv, "[final]", m, "stop", chat_template_kwargs=kwargs)
    m, kwargs = opened("final")
    assert m["content"] == "It is four." and "reasoning" not in m
    _same_stream(srv, "[final]", m, "stop", chat_template_kwargs=kwargs)
    pytest.importorskip("xgrammar")
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "string", "enum": ["yes", "no"]}}}
    m, _ = opened("final", response_format=fmt)
    assert json.loads(m["content"]) in ("yes", "no")
