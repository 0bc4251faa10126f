"""Structured output and tool calling through the real server and the official openai SDK.

The full 16-schema set runs offline (tests/structured_output/test_offline.py); here a subset
checks each request form end to end, sent concurrently so constrained and plain requests share
batches."""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "structured_output"))
from so_schemas import SCHEMAS  # noqa: E402

jsonschema = pytest.importorskip("jsonschema")

MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Reply with JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
        "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _schema_request(client, name):
    return client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=48, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}},
        extra_body=COMPACT)


# JSON without optional whitespace: a 135M model may otherwise loop on newlines.
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}


def test_forms_in_one_batch(client):
    names = ["person", "nested", "ref_defs", "array_min_max"]
    with ThreadPoolExecutor(8) as pool:
        schema_futs = {n: pool.submit(_schema_request, client, n) for n in names}
        obj = pool.submit(client.chat.completions.create, model=MODEL, max_tokens=48, temperature=0,
                          messages=[{"role": "user", "content": 'Reply with a JSON object like {"a": 1}.'}],
                          response_format={"type": "json_object"}, extra_body=COMPACT)
        regex = pool.submit(client.completions.create, model=MODEL, prompt="A code:", max_tokens=12,
                            temperature=0, extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"})
        choice = pool.submit(client.chat.completions.create, model=MODEL, messages=WEATHER_ASK, max_tokens=8,
                             temperature=0, extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
        plain = pool.submit(client.chat.completions.create, model=MODEL, messages=WEATHER_ASK, max_tokens=8,
                            temperature=0)
    for name, fut in schema_futs.items():
        jsonschema.validate(json.loads(fut.result().choices[0].message.content), SCHEMAS[name])
    assert isinstance(json.loads(obj.result().choices[0].message.content), dict)
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", regex.result().choices[0].text)
    assert choice.result().choices[0].message.content in ("sunny", "rainy")
    alone = client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, max_tokens=8, temperature=0)
    assert plain.result().choices[0].message.content == alone.choices[0].message.content


def _named(client, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=WEATHER_ASK, max_tokens=40, temperature=0, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body=COMPACT, **kw)


def test_named_tool_choice_streams_and_validates(client):
    r = _named(client)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(_named(client, stream=True))
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
    assert all(p.index == 0 for p in pieces)


def test_required_tool_choice_and_tool_history(client):
    r = client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, max_tokens=60, temperature=0,
                                       tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
                                       extra_body=COMPACT)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    jsonschema.validate(json.loads(calls[0].function.arguments), schema[calls[0].function.name])
    history = WEATHER_ASK + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21}'}]
    r = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0,
                                       tools=[WEATHER, TIME], tool_choice="none")
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= "}}}, "structured_outputs"),
    ({"extra_body": {"guided_json": {"type": "object"}, "guided_regex": "a"}}, "guided_regex"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
])
def test_malformed_constraint_is_a_400_and_the_server_keeps_serving(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **extra)
    assert info.value.body["param"] == param, info.value.body
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4,
                                       response_format={"type": "json_object"}, extra_body=COMPACT)
    assert r.choices[0].message.content.startswith("{")
