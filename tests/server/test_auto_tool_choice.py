"""``tool_choice: "auto"`` end to end: a server started with ``--enable-auto-tool-choice
--tool-call-parser P``, the bundled SmolLM2 and the official openai SDK.

SmolLM2 was never trained to call tools, so the request also carries an EBNF grammar that
forces the model's text into P's call format, with arguments that the tool's JSON schema
accepts (compact JSON: a 135M model left free whitespace loops on it). The whole path runs for
real: grammar -> sampled tokens -> detokenized text -> P ->
OpenAI ``tool_calls`` (ids, ``finish_reason: "tool_calls"``), whole and as ``delta.tool_calls``
chunks that reassemble to the same call."""

from __future__ import annotations

import json

import openai
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

MODEL = "SmolLM2-135M-Instruct"
PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 16},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                            "parameters": PARAMS}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

# Per parser: the text before the arguments object, the text after it, the content expected.
FORMATS = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": ', "}\n</tool_call>",
               "Let me check.\n"),
    "llama3_json": ('{"name": "get_weather", "parameters": ', "}", None),
    "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": ', "}]", None),
}


def _forced(parser: str) -> str:
    """An EBNF grammar: ``before`` + a compact arguments object valid against PARAMS + ``after``."""
    before, after, _ = FORMATS[parser]
    lit = json.dumps  # an EBNF string literal
    city_key, unit_key, close = '{"city": "', '", "unit": "', '"}'
    args = f'{lit(city_key)} [A-Za-z]{{1,16}} {lit(unit_key)} ("celsius" | "fahrenheit") {lit(close)}'
    return f"root ::= {lit(before)} {args} {lit(after)}"


@pytest.mark.parametrize("parser", ["hermes", pytest.param("llama3_json", marks=pytest.mark.slow),
                                    pytest.param("mistral", marks=pytest.mark.slow)])
def test_auto_tool_choice_through_the_server(request, server_factory, parser):
    # hermes: conftest's tools_server (its parser; a template that shows the tools), shared
    srv = request.getfixturevalue("tools_server") if parser == "hermes" else \
        server_factory(["--enable-auto-tool-choice", "--tool-call-parser", parser])
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key=srv.api_key, max_retries=0, timeout=300) as client:
        kw = dict(model=MODEL, messages=ASK, max_tokens=160, temperature=0, tools=[WEATHER], tool_choice="auto",
                  extra_body={"structured_outputs": {"grammar": _forced(parser)}})
        r = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(stream=True, **kw))
        plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0,
                                               tools=[WEATHER], tool_choice="auto")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), PARAMS)
    assert choice.message.content == FORMATS[parser][2]
    # The stream: the same call in delta.tool_calls pieces (id and name first), the same end.
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id and pieces[0].function.name == "get_weather" and all(p.index == 0 for p in pieces)
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == json.loads(call.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (FORMATS[parser][2] or "")
    # Without a call in its text, "auto" answers with content and no tool_calls.
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls
    assert plain.choices[0].finish_reason != "tool_calls"
