"""``--reasoning-parser muse_glimmer --tool-call-parser muse_glimmer`` served end to end: a
bigram model (tests/server/thinking_model.py) writing MuseGlimmer's channels, a thought, an ATEM
call in a tool channel and an answer; the call is a ``tool_calls`` entry, the thought the
reasoning, the answer the content, whole and streamed, for tool_choice auto and required (no
grammar: the parser reads the model's own markup)."""

from __future__ import annotations

import json

import pytest

SELF_H, USER_H = "to=self<|message|>", "to=user<|message|>"  # one special token each here
CALL = ['<|eom|><|start|>assistant to=weather.get<|message|>',
        '<atem:function_calls><atem:invoke name="weather.get"><atem:parameter name="city">', '"Paris"',
        "</atem:parameter></atem:invoke></atem:function_calls><|eom|>"]
CHAINS = {"[glim]": [SELF_H, " Check", *CALL, USER_H, " Sunny.", "<|eot|>", "</s>"]}
TOOLS = [{"type": "function", "function": {"name": "weather.get", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def srv(server_factory, tmp_path_factory):
    from tests.server.thinking_model import make_thinking_model

    model = make_thinking_model(str(tmp_path_factory.mktemp("glimmer_tools")), special_markers=True,
                                markers=(SELF_H, USER_H), chains=CHAINS)
    return server_factory([model, "--served-model-name", "m", "--reasoning-parser", "muse_glimmer",
                           "--tool-call-parser", "muse_glimmer"])


def _chat(srv, **body):
    import httpx

    body = {"model": "m", "messages": [{"role": "user", "content": "[glim]"}], "max_tokens": 20,
            "temperature": 0, "tools": TOOLS, **body}
    if not body.get("stream"):
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=srv.headers, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        m = choice["message"]
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in m.get("tool_calls") or []]
        return m.get("reasoning"), m.get("content"), calls, choice["finish_reason"]
    reasoning, content, calls, finish = [], [], {}, None
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, headers=srv.headers, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in httpx.Response(200, content=line[6:]).json()["choices"]:
                    delta = choice["delta"]
                    reasoning.append(delta.get("reasoning") or "")
                    content.append(delta.get("content") or "")
                    for piece in delta.get("tool_calls") or []:
                        call = calls.setdefault(piece["index"], ["", ""])
                        call[0] += piece["function"].get("name") or ""
                        call[1] += piece["function"].get("arguments") or ""
                    finish = choice.get("finish_reason") or finish
    return ("".join(reasoning), "".join(content),
            [(n, json.loads(a)) for n, a in (calls[i] for i in sorted(calls))], finish)


@pytest.mark.slow  # a server of its own (~35 s on 2 cores); the parser and the plans: test_tool_parser_muse_glimmer.py
@pytest.mark.parametrize("choice", ["auto", "required"])
def test_call_reasoning_and_answer_whole_and_streamed(srv, choice):
    want = (" Check", " Sunny.", [("weather.get", {"city": "Paris"})], "tool_calls")
    assert _chat(srv, tool_choice=choice) == want
    assert _chat(srv, tool_choice=choice, stream=True) == want
