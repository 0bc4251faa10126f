"""``--tool-call-parser muse_glimmer``: MuseGlimmer's ATEM invokes read from its tool channels
only (an invoke echoed in a ``to=self`` or ``to=user`` body is text), whole, streamed and cut at
random; names normalized as vLLM's; the server's plans (required / named read natively, no
grammar; behind ``--reasoning-parser muse_glimmer`` the parser reads the whole output)."""

from __future__ import annotations

import json

import pytest
from test_tool_parsers import check_random_chunkings, check_stream

from tessellm.entrypoints.openai.protocol import ChatCompletionRequest
from tessellm.entrypoints.openai.tool_parsers import get_tool_parser
from tessellm.entrypoints.openai.tool_parsers_muse_glimmer import invokes
from tessellm.entrypoints.openai.tools import ToolCallView, ToolPlan


def _invoke(name: str, **params) -> str:
    return (f'<atem:invoke name="{name}">'
            + "".join(f'<atem:parameter name="{k}">{v}</atem:parameter>' for k, v in params.items())
            + "</atem:invoke>")


def _tool(recipient: str, *calls: str) -> str:
    return f"<|start|>assistant to={recipient}<|message|><atem:function_calls>\n" + "\n".join(calls) \
        + "\n</atem:function_calls><|eom|>"


WEATHER = _invoke("weather.get", city='"Paris"', days="3")
ECHO = _invoke("leak.now", x="1")
RECORDED = [
    ("muse_glimmer", " to=self<|message|>Look it up first " + ECHO + "<|eom|>" + _tool("weather.get", WEATHER)
     + "<|start|>assistant to=user<|message|>It is sunny, to=me at least.<|eot|>",
     "It is sunny, to=me at least.", [("weather.get", {"city": "Paris", "days": 3})]),
    ("muse_glimmer", _tool("functions", WEATHER, _invoke("time.now")), "",
     [("weather.get", {"city": "Paris", "days": 3}), ("time.now", {})]),
    # a to=self block cut off before its <|eom|> cannot swallow the call after it (selection)
    ("muse_glimmer", "to=self<|message|>thinking" + _tool("f", _invoke("f", q="not json {")), "",
     [("f", {"q": "not json {"})]),
    ("muse_glimmer", "<|message|>untagged " + ECHO + "<|eot|>", "untagged " + ECHO, []),
    ("muse_glimmer", "Plain text, no channel.", "Plain text, no channel.", []),
    # truncated: the invoke never closes (no call, and a tool channel is never content)
    ("muse_glimmer", "to=user<|message|>Let me see.<|eom|>" + _tool("f")[:-40] + '<atem:invoke name="f">',
     "Let me see.", []),
    ("muse_glimmer", "to=user<|message|>a <|eot|>to=user<|message|>b <|start|>assistant", "a b ", []),
]


@pytest.mark.parametrize("name,text,content,calls", RECORDED)
@pytest.mark.parametrize("step", [1, 3, 17, len(RECORDED[0][1])])
def test_streams_and_whole_outputs(name, text, content, calls, step):
    check_stream(name, text, content, calls, step)


@pytest.mark.parametrize("seed", range(6))
def test_random_chunkings(seed):
    check_random_chunkings(RECORDED, seed)


def test_invoke_markup():
    """Parameters inside their invoke only; another tag's prefix is not an invoke; an invoke
    with no name is none; a value that is not strict JSON (NaN) stays the string."""
    body = ('<atem:invokes name="x"></atem:invoke><atem:invoke>no name</atem:invoke>'
            '<atem:invoke name="g"><atem:parameter name="a">NaN</atem:parameter>'
            '<atem:parameter name="b">{"k": [1, "</atem:invoke"]}</atem:parameter></atem:invoke>'
            '<atem:parameter name="outside">1</atem:parameter>')
    assert invokes(body) == [("g", {"a": "NaN", "b": {"k": [1, "</atem:invoke"]}})]
    assert invokes('<atem:invoke name="f"><atem:parameter name="a">1</atem:parameter>') == []  # not closed


def _request(*names: str, **extra) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **extra, tools=[
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in names])


def test_names_normalized_as_vllm():
    """``get_weather.get_weather`` is ``get_weather`` when only that is registered; a leaf
    match is never guessed (``weather.get`` stays, with ``calendar.get`` registered)."""
    text = _tool("get_weather", _invoke("get_weather.get_weather", c='"x"'), _invoke("weather.get"))
    req = _request("get_weather", "calendar.get")
    _, calls = ToolCallView(get_tool_parser("muse_glimmer", request=req)).final(text)
    assert [c.function.name for c in calls] == ["get_weather", "weather.get"]
    assert json.loads(calls[0].function.arguments) == {"c": "x"}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "f"}}])
def test_required_and_named_are_read_natively(choice):
    """No JSON grammar (the model would write JSON inside its tool channel): the parser reads
    the ATEM calls, as vLLM's ``supports_required_and_named = False``; without the parser, the
    grammar as for every other parser."""
    plan = ToolPlan(_request("f", tool_choice=choice), "muse_glimmer")
    assert plan.forced_schema() is None and plan.parser.name == "muse_glimmer"
    _, calls = plan.view().final(_tool("f", _invoke("f", a="1")))
    assert [(c.function.name, c.function.arguments) for c in calls] == [("f", '{"a": 1}')]
    assert ToolPlan(_request("f", tool_choice=choice), "hermes").forced_schema() is not None
    assert ToolPlan(_request("f", tool_choice="none"), "muse_glimmer").parser is None


def test_behind_the_reasoning_parser():
    """With ``--reasoning-parser muse_glimmer`` the tool parser reads the whole output from the
    channel the prompt left open (``to=self`` here): reasoning the self bodies, content the
    user body, the call from the tool channel; streamed the same."""
    from tessellm.entrypoints.openai.reasoning import ReasoningPlan, ReasoningStream
    from tests.tiny_tokenizer import bpe_tokenizer

    tok = bpe_tokenizer(["abc"], ["<pad>", "<s>", "</s>"], 259, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|message|>", "<|eom|>", "<|eot|>"]})
    prompt = tok.encode("<|start|>user<|message|>hi<|eom|><|start|>assistant to=self<|message|>",
                        add_special_tokens=False)
    plan = ReasoningPlan("muse_glimmer", tok, prompt, include=True)
    parser = get_tool_parser("muse_glimmer", tok, _request("f"))
    plan.read_by(parser)
    text = "abc" + ECHO + "<|eom|>" + _tool("f", _invoke("f", a="[1]")) + "<|start|>assistant to=user<|message|>cab<|eot|>"
    reasoning, answer = plan.split().split(text, [], True)
    content, calls = ToolCallView(parser).final(answer)
    assert (reasoning, content) == ("abc" + ECHO, "cab")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("f", {"a": [1]})]
    stream, view, got = ReasoningStream(plan), ToolCallView(get_tool_parser("muse_glimmer", tok, _request("f"))), ""
    view.parser.opened = "self"
    for n in range(1, len(text) + 1):
        fields, answer = stream.delta(text[:n], [], n == len(text))
        got += view.delta(answer, n == len(text))[0]
    assert got == "cab" and view.num_calls == 1
