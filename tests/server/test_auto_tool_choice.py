"""``tool_choice: "auto"`` end to end: a server started with ``--enable-auto-tool-choice
--tool-call-parser P``, the bundled SmolLM2 and the official openai SDK.

SmolLM2 was never trained to call tools, so the request also carries an EBNF grammar that
forces the model's text into P's call format, with arguments that the tool's JSON schema
accepts (compact JSON: a 135M model left free whitespace loops on it). The whole path runs for
real: grammar -> sampled tokens -> detokenized text -> P ->
OpenAI ``tool_calls`` (ids, ``finish_reason: "tool_calls"``), whole and as ``delta.tool_calls``
chunks that reassemble to the same call. ``toy_json`` is a vLLM parser loaded with
``--tool-parser-plugin``; ``toy_stream`` one that streams its calls itself, per delta."""

from __future__ import annotations

import json
from pathlib import Path

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

# Per parser: the text the grammar forces ({CITY}: 1-16 letters, {UNIT}: celsius or fahrenheit)
# and the content expected. One format family per parser: JSON objects (hermes, llama3_json,
# mistral, granite, jamba), XML parameters typed by the schema (qwen3_coder, glm45), Python call
# lists (pythonic), special-token sections (deepseek_v31, kimi_k2) and a vLLM plugin (toy_json).
_ARGS = '{"city": "{CITY}", "unit": "{UNIT}"}'
FORMATS = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": ' + _ARGS + "}\n</tool_call>",
               "Let me check.\n"),
    "llama3_json": ('{"name": "get_weather", "parameters": ' + _ARGS + "}", None),
    "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": ' + _ARGS + "}]", None),
    "qwen3_coder": ("Checking.<tool_call>\n<function=get_weather>\n<parameter=city>\n{CITY}\n</parameter>\n"
                    "<parameter=unit>\n{UNIT}\n</parameter>\n</function>\n</tool_call>", "Checking."),
    "glm45": ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>{CITY}</arg_value>\n<arg_key>unit"
              "</arg_key>\n<arg_value>{UNIT}</arg_value>\n</tool_call>", None),
    "pythonic": ('[get_weather(city="{CITY}", unit="{UNIT}")]', None),
    "deepseek_v31": ("Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>" + _ARGS
                     + "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "Sure."),
    "kimi_k2": ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
                + _ARGS + "<|tool_call_end|><|tool_calls_section_end|>", None),
    "granite": ('<tool_call>[{"name": "get_weather", "arguments": ' + _ARGS + "}]", None),
    "jamba": ('<tool_calls>[{"name": "get_weather", "arguments": ' + _ARGS + "}]</tool_calls>", None),
    "toy_json": ('Checking.<<call>>[{"name": "get_weather", "arguments": ' + _ARGS + "}]<</call>>", "Checking."),
}
PLUGIN = str(Path(__file__).parent.parent / "structured_output" / "vllm_tool_parser_plugin.py")
# A vLLM plugin that streams its calls itself (extract_tool_calls_streaming): toy_stream's format
STREAMING_PLUGIN = str(Path(__file__).parent.parent / "structured_output" / "vllm_streaming_tool_parser_plugin.py")
STREAMED = "Checking.<<get_weather|" + _ARGS + ">>"


def _forced(text: str) -> str:
    """An EBNF grammar for ``text`` (a format of FORMATS): a city of letters, a unit of the enum
    (arguments valid against PARAMS; compact: a 135M model left free whitespace loops on it)."""
    def lit(text: str) -> str:  # an EBNF string literal
        return json.dumps(text, ensure_ascii=False)

    parts = []
    for piece in text.split("{CITY}"):
        for j, literal in enumerate(piece.split("{UNIT}")):
            parts += (['("celsius" | "fahrenheit")'] if j else []) + ([lit(literal)] if literal else [])
        parts.append("[A-Za-z]{1,16}")
    return "root ::= " + " ".join(parts[:-1])


def _server(request, server_factory, parser: str):
    if parser == "hermes":  # conftest's tools_server (its parser; a template that shows the tools), shared
        return request.getfixturevalue("tools_server")
    plugin = ["--tool-parser-plugin", PLUGIN] if parser == "toy_json" else []
    return server_factory(["--enable-auto-tool-choice", *plugin, "--tool-call-parser", parser])


@pytest.mark.parametrize("parser", ["hermes", "toy_json", *(pytest.param(p, marks=pytest.mark.slow) for p in FORMATS
                                                             if p not in ("hermes", "toy_json"))])
def test_auto_tool_choice_through_the_server(request, server_factory, parser):
    srv = _server(request, server_factory, parser)
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key=srv.api_key, max_retries=0, timeout=300) as client:
        kw = dict(model=MODEL, messages=ASK, max_tokens=160, temperature=0, tools=[WEATHER], tool_choice="auto",
                  extra_body={"structured_outputs": {"grammar": _forced(FORMATS[parser][0])}})
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
    assert choice.message.content == FORMATS[parser][1]
    # The stream: the same call in delta.tool_calls pieces (id and name first), the same end.
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id and pieces[0].function.name == "get_weather" and all(p.index == 0 for p in pieces)
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == json.loads(call.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (FORMATS[parser][1] or "")
    # Without a call in its text, "auto" answers with content and no tool_calls.
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls
    assert plain.choices[0].finish_reason != "tool_calls"


def test_a_plugin_that_streams_its_calls_streams_them_through_the_server(server_factory):
    """A ``--tool-parser-plugin`` parser with ``extract_tool_calls_streaming`` (toy_stream), per
    delta through the real server (the chat stream hands it the output's token ids; ids that do
    not match its text make it raise, and the output would be content): the call's pieces
    arrive before the output ends, the arguments in more than one, and they assemble into the
    call of the response that is not streamed."""
    srv = server_factory(["--enable-auto-tool-choice", "--tool-parser-plugin", STREAMING_PLUGIN,
                          "--tool-call-parser", "toy_stream"])
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key=srv.api_key, max_retries=0, timeout=300) as client:
        kw = dict(model=MODEL, messages=ASK, max_tokens=160, temperature=0, tools=[WEATHER], tool_choice="auto",
                  extra_body={"structured_outputs": {"grammar": _forced(STREAMED)}})
        r = client.chat.completions.create(**kw)
        chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    (call,) = r.choices[0].message.tool_calls
    assert (r.choices[0].finish_reason, r.choices[0].message.content, call.function.name) == (
        "tool_calls", "Checking.", "get_weather")
    jsonschema.validate(json.loads(call.function.arguments), PARAMS)
    with_calls = [i for i, c in enumerate(chunks) if c.choices[0].delta.tool_calls]
    end = next(i for i, c in enumerate(chunks) if c.choices[0].finish_reason)
    assert (end, chunks[end].choices[0].finish_reason) == (len(chunks) - 1, "tool_calls")
    assert len(with_calls) > 2 and with_calls[0] < with_calls[-2] < end  # name, then arguments as they grow
    pieces = [tc for i in with_calls for tc in chunks[i].choices[0].delta.tool_calls]
    assert pieces[0].id and pieces[0].function.name == "get_weather" and all(p.index == 0 for p in pieces)
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Checking."
