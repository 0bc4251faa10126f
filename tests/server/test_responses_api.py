"""POST /v1/responses end to end: a real server (the bundled SmolLM2), the official openai SDK,
and every body and stream event parsed strictly with the SDK's own ``openai.types.responses``
models. Greedy output equals /v1/chat/completions' for the same conversation (one engine path);
a stream's deltas concatenate to the final text; bad requests are 400s naming the field."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from pydantic import TypeAdapter

from openai.types.responses import Response, ResponseStreamEvent
from tests.server.responses_events import check_stream

jsonschema = pytest.importorskip("jsonschema")

MODEL = "SmolLM2-135M-Instruct"
EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "minLength": 1, "maxLength": 12},
               "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
               "additionalProperties": False}}
ASK = "What is the weather in Paris?"


def _post(http, **body) -> dict:
    r = http.post("/v1/responses", json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    Response.model_validate(r.json(), strict=False)  # the SDK's model reads it (required keys, types)
    return r.json()


def _chat(http, messages, **body) -> dict:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _text(resp: dict) -> str:
    return "".join(p["text"] for item in resp["output"] if item["type"] == "message" for p in item["content"])


def _stream(http, **body) -> list:
    """The stream's events, each parsed strictly by the SDK's union of event types."""
    events = []
    with http.stream("POST", "/v1/responses", json={"model": MODEL, "temperature": 0, "stream": True, **body}) as r:
        assert r.status_code == 200
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == kind, (kind, data)
                events.append(EVENTS.validate_python(data))
    check_stream(events)  # OpenAI's event order, item by item
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def test_text_input_equals_chat(http):
    resp = _post(http, input="What is the capital of France?", max_output_tokens=12)
    chat = _chat(http, [{"role": "user", "content": "What is the capital of France?"}], max_tokens=12)
    assert resp["object"] == "response" and resp["id"].startswith("resp_") and resp["model"] == MODEL
    assert [i["type"] for i in resp["output"]] == ["message"]
    assert resp["output"][0]["role"] == "assistant" and resp["output"][0]["id"].startswith("msg_")
    assert _text(resp) == chat["message"]["content"] and _text(resp)
    usage = resp["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] and usage["output_tokens"] <= 12
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0, "tool_output_tokens": 0,  # vLLM's keys
                                              "output_tokens_per_turn": [], "tool_output_tokens_per_turn": []}
    assert usage["input_tokens_details"]["input_tokens_per_turn"] == []
    assert resp["store"] is False and resp["metadata"] == {}


@pytest.mark.parametrize("effort", ["none", "xhigh"])
def test_reasoning_effort_equals_chats(http, effort):
    """reasoning.effort as the chat request's reasoning_effort (any of the openai package's
    values; SmolLM2's template reads neither it nor enable_thinking), echoed in the response."""
    resp = _post(http, input="Name a colour.", max_output_tokens=6, reasoning={"effort": effort})
    chat = _chat(http, [{"role": "user", "content": "Name a colour."}], max_tokens=6, reasoning_effort=effort)
    assert resp["reasoning"]["effort"] == effort and _text(resp) == chat["message"]["content"]


def test_instructions_and_message_list_equal_chat(http):
    items = [{"role": "user", "content": "Name a fruit."},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Apple."}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Another one?"}]}]
    resp = _post(http, input=items, instructions="Answer in one word.", max_output_tokens=8,
                 metadata={"run": "7"}, user="u1", store=False)
    chat = _chat(http, [{"role": "system", "content": "Answer in one word."},
                        {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."},
                        {"role": "user", "content": "Another one?"}], max_tokens=8)
    assert _text(resp) == chat["message"]["content"]
    assert resp["instructions"] == "Answer in one word." and resp["metadata"] == {"run": "7"}
    tokens = http.post("/tokenize", json={"model": MODEL, "messages": [
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."}, {"role": "user", "content": "Another one?"}]}).json()
    assert resp["usage"]["input_tokens"] == tokens["count"]  # the same prompt, token for token


def test_max_output_tokens_is_incomplete(http):
    resp = _post(http, input="Write a long story about a dragon.", max_output_tokens=3)
    assert resp["status"] == "incomplete"
    assert resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert resp["usage"]["output_tokens"] == 3 and resp["output"][-1]["status"] == "incomplete"


def test_json_schema_output(http):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    resp = _post(http, input="Give a person as JSON.", max_output_tokens=60,
                 text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}})
    assert resp["status"] == "completed", resp
    jsonschema.validate(json.loads(_text(resp)), schema)
    assert resp["text"]["format"]["type"] == "json_schema" and resp["text"]["format"]["schema"] == schema
    events = _stream(http, input="Give a person as JSON.", max_output_tokens=60,  # the same, streamed
                     text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}})
    assert events[-1].response.output_text == _text(resp) and events[-1].response.text.format.type == "json_schema"
    obj = _post(http, input="Give a person as JSON.", max_output_tokens=60, text={"format": {"type": "json_object"}})
    assert obj["status"] != "completed" or isinstance(json.loads(_text(obj)), dict)


def test_forced_function_call_and_follow_up_turn(http):
    resp = _post(http, input=ASK, max_output_tokens=60, tools=[WEATHER],
                 tool_choice={"type": "function", "name": "get_weather"})
    assert resp["status"] == "completed", resp
    calls = [i for i in resp["output"] if i["type"] == "function_call"]
    assert len(calls) == 1 and [i["type"] for i in resp["output"]] == ["function_call"]
    call = calls[0]
    assert call["name"] == "get_weather" and call["call_id"].startswith("call_") and call["id"].startswith("fc_")
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["parameters"])
    assert resp["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert resp["tools"][0]["name"] == "get_weather"
    # the next turn: the call and its output sent back as items; the chat path sees the same history
    turn = [{"role": "user", "content": ASK}, call,
            {"type": "function_call_output", "call_id": call["call_id"], "output": '{"temperature": 21}'}]
    follow = _post(http, input=turn, max_output_tokens=10, tools=[WEATHER], tool_choice="none")
    chat = _chat(http, [{"role": "user", "content": ASK},
                        {"role": "assistant", "content": "", "tool_calls": [
                            {"id": call["call_id"], "type": "function",
                             "function": {"name": "get_weather", "arguments": call["arguments"]}}]},
                        {"role": "tool", "tool_call_id": call["call_id"], "content": '{"temperature": 21}'}],
                 max_tokens=10, tools=[{"type": "function", "function": {k: WEATHER[k] for k in
                                                                         ("name", "description", "parameters")}}],
                 tool_choice="none")
    assert [i["type"] for i in follow["output"]] == ["message"]
    assert _text(follow) == chat["message"]["content"] and _text(follow)


def test_stream_events_in_order_and_deltas_make_the_text(http):
    whole = _post(http, input="What is the capital of France?", max_output_tokens=12)
    events = _stream(http, input="What is the capital of France?", max_output_tokens=12)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole['status']}"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == _text(whole)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == text
    final = events[-1].response
    assert final.output_text == text and final.status == whole["status"]
    assert final.usage.output_tokens == whole["usage"]["output_tokens"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []


def test_stream_function_call_arguments(http):
    body = dict(input=ASK, max_output_tokens=60, tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"})
    whole = _post(http, **body)
    events = _stream(http, **body)
    kinds = [e.type for e in events]
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.name == "get_weather"
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == whole["output"][0]["arguments"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == args and done.item_id == added.item.id
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    assert events[-1].response.output[0].arguments == args


def test_vllm_sampling_extras(http):
    """vLLM's extras pass to the chat path: top_k 1 samples greedily, a seed repeats a sample,
    a stop string ends the text before it, request_id names the response."""
    ask = "Describe the sea."
    greedy = _text(_post(http, input=ask, max_output_tokens=12))
    assert _text(_post(http, input=ask, max_output_tokens=12, temperature=1.0, top_k=1)) == greedy
    seeded = [_post(http, input=ask, max_output_tokens=12, temperature=1.0, seed=7) for _ in range(2)]
    assert _text(seeded[0]) == _text(seeded[1])
    word = greedy.split()[2]
    stopped = _post(http, input=ask, max_output_tokens=12, stop=[word], request_id="abc")
    assert _text(stopped) == greedy[:greedy.index(word)] and stopped["id"] == "resp_abc"


def test_vllm_extras_of_this_audit_equal_chats(http):
    """logit_bias, include_stop_str_in_output and chat_template_kwargs reach the chat path (the
    same text as /v1/chat/completions with them); service_tier and max_tool_calls are echoed, as
    vLLM does, with the penalties as sampled."""
    ask, messages = "Describe the sea.", [{"role": "user", "content": "Describe the sea."}]
    greedy = _text(_post(http, input=ask, max_output_tokens=8))
    first = http.post("/tokenize", json={"model": MODEL, "prompt": greedy, "add_special_tokens": False}).json()
    bias = {str(first["tokens"][0]): -100}
    biased = _post(http, input=ask, max_output_tokens=8, logit_bias=bias)
    assert _text(biased) != greedy
    assert _text(biased) == _chat(http, messages, max_tokens=8, logit_bias=bias)["message"]["content"]
    word = greedy.split()[2]
    kept = _post(http, input=ask, max_output_tokens=8, stop=[word], include_stop_str_in_output=True)
    assert _text(kept) == greedy[:greedy.index(word) + len(word)]
    echoed = _post(http, input=ask, max_output_tokens=2, service_tier="flex", max_tool_calls=3,
                   presence_penalty=0.5, chat_template_kwargs={"unused": 1}, session_id="s1")
    assert (echoed["service_tier"], echoed["max_tool_calls"], echoed["background"]) == ("flex", 3, False)
    assert echoed["presence_penalty"] == 0.5 and echoed["frequency_penalty"] == 0.0
    assert "kv_transfer_params" not in echoed
    no_tools = _post(http, input=ask, max_output_tokens=2, tool_choice="auto", tools=[])  # vLLM: "none"
    assert no_tools["tool_choice"] == "none" and no_tools["tools"] == []


def test_partial_assistant_message_is_continued(http):
    """vLLM's partial completion: a last assistant message whose status is in_progress (or
    incomplete) is continued, not closed: the prompt and text of chat's continue_final_message."""
    start = "The sea is"
    items = [{"role": "user", "content": "Describe the sea."},
             {"type": "message", "role": "assistant", "status": "in_progress",
              "content": [{"type": "output_text", "text": start}]}]
    resp = _post(http, input=items, max_output_tokens=8)
    messages = [{"role": "user", "content": "Describe the sea."}, {"role": "assistant", "content": start}]
    chat = _chat(http, messages, max_tokens=8, continue_final_message=True, add_generation_prompt=False)
    assert _text(resp) == chat["message"]["content"] and _text(resp)
    closed = _post(http, input=[items[0], {**items[1], "status": "completed"}, items[0]], max_output_tokens=1)
    assert resp["usage"]["input_tokens"] < closed["usage"]["input_tokens"]  # no turn closed, none opened
    tokens = http.post("/tokenize", json={"model": MODEL, "messages": messages, "continue_final_message": True,
                                          "add_generation_prompt": False}).json()
    assert resp["usage"]["input_tokens"] == tokens["count"]


def test_reasoning_item_with_no_message_after_it_is_a_message_of_its_own(http):
    """As vLLM builds it: a reasoning item not followed by an assistant message (here the last
    item) becomes an assistant message holding that reasoning, not dropped."""
    items = [{"role": "user", "content": "Name a fruit."},
             {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Think."}]}]
    resp = _post(http, input=items, max_output_tokens=1)
    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "", "reasoning": "Think."}]
    tokens = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert resp["usage"]["input_tokens"] == tokens["count"]


def test_truncation_auto_keeps_the_prompts_end(http):
    """truncation "auto" (vLLM's truncate_prompt_tokens -1): an input over the context loses
    its start, leaving max_output_tokens of room; "disabled" (the default) is a 400."""
    long = "word " * 1500  # over the test server's 1024-token context
    r = http.post("/v1/responses", json={"model": MODEL, "input": long, "max_output_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
    resp = _post(http, input=long, max_output_tokens=4, truncation="auto")
    assert resp["usage"]["input_tokens"] == 1024 - 4 and resp["truncation"] == "auto"
    assert resp["usage"]["output_tokens"] <= 4


def test_output_text_logprobs_whole_and_streamed(http):
    body = dict(input="Name a color.", max_output_tokens=8, include=["message.output_text.logprobs"], top_logprobs=2)
    resp = _post(http, **body)
    chat = _chat(http, [{"role": "user", "content": "Name a color."}], max_tokens=8, logprobs=True, top_logprobs=2)
    part = resp["output"][0]["content"][0]

    def tokens(entries):
        return [(lp["token"], lp["bytes"], [t["token"] for t in lp["top_logprobs"]]) for lp in entries]

    assert tokens(part["logprobs"]) == tokens(chat["logprobs"]["content"])
    # logprobs to float noise (batch shapes differ between requests)
    assert [lp["logprob"] for lp in part["logprobs"]] == \
        pytest.approx([lp["logprob"] for lp in chat["logprobs"]["content"]], abs=1e-3)
    assert len(part["logprobs"]) == resp["usage"]["output_tokens"]
    assert all(len(lp["top_logprobs"]) == 2 for lp in part["logprobs"]) and resp["top_logprobs"] == 2
    events = _stream(http, **body)
    streamed = [lp.model_dump() for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [lp["token"] for lp in streamed] == [lp["token"] for lp in part["logprobs"]]
    assert [lp["logprob"] for lp in streamed] == pytest.approx([lp["logprob"] for lp in part["logprobs"]], abs=1e-3)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [lp.token for lp in done.logprobs] == [lp["token"] for lp in part["logprobs"]]
    assert events[-1].response.output[0].content[0].logprobs[0].top_logprobs[0].token == \
        part["logprobs"][0]["top_logprobs"][0]["token"]
    assert _post(http, input="Name a color.", max_output_tokens=8)["output"][0]["content"][0]["logprobs"] == []


def test_client_leaving_a_stream_aborts_its_request(server, http):
    with http.stream("POST", "/v1/responses", json={"model": MODEL, "input": "Tell a very long story.",
                                                     "max_output_tokens": 900, "stream": True}) as r:
        deltas = 0
        for line in r.iter_lines():
            deltas += line.startswith("event: response.output_text.delta")
            if deltas == 3:
                break  # leave mid-stream
    deadline = time.monotonic() + 5  # 900 tokens take far longer
    while server.stats()["num_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.stats()["num_requests"] == 0  # aborted, not left running to 900 tokens


def test_sdk_client_reads_responses(client):
    r = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=6, temperature=0)
    assert r.output_text and r.usage.output_tokens <= 6
    events = list(client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=6, temperature=0,
                                          stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].type == f"response.{r.status}" and events[-1].response.output_text == r.output_text
    # the SDK's stream helper (it waits for response.completed: a forced call completes)
    tool = {**WEATHER, "strict": True}
    with client.responses.stream(model=MODEL, input=ASK, max_output_tokens=60, temperature=0, tools=[tool],
                                 tool_choice={"type": "function", "name": "get_weather"}) as s:
        args = "".join(e.delta for e in s if e.type == "response.function_call_arguments.delta")
        final = s.get_final_response()
    assert final.output[0].type == "function_call" and final.output[0].arguments == args
    jsonschema.validate(json.loads(args), WEATHER["parameters"])


def test_nothing_stored_by_default(http):
    resp = _post(http, input="hi", max_output_tokens=2)
    assert resp["store"] is False
    r = http.get(f"/v1/responses/{resp['id']}")
    assert r.status_code == 404 and "--responses-store-size" in r.json()["error"]["message"]


def test_sdk_parse_with_a_pydantic_model(client):
    """The SDK's responses.parse: its strict json_schema constrains the output, which it parses."""
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=120)

    r = client.responses.parse(model=MODEL, input="Give a person.", text_format=Person, max_output_tokens=60,
                               temperature=0, extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    assert r.status == "completed" and isinstance(r.output_parsed, Person)
    assert r.output_parsed == Person.model_validate_json(r.output_text)


def test_thinking_token_budget_is_a_400_pointing_at_chat(http):
    """vLLM's ResponsesRequest has no thinking_token_budget (its chat and completions requests
    do): a 400 that says where it works; -1 (no budget) is accepted."""
    r = http.post("/v1/responses", json={"model": MODEL, "input": "hi", "thinking_token_budget": 8})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("thinking_token_budget", "unsupported_parameter"), err
    assert "/v1/chat/completions" in err["message"] and "reasoning.effort" in err["message"], err
    assert _post(http, input="hi", max_output_tokens=2, thinking_token_budget=-1)["status"] in ("completed",
                                                                                                 "incomplete")


@pytest.mark.parametrize("body,param", [
    ({"input": "hi", "foo": 1}, "foo"),
    ({"input": []}, "input"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input.0.role"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input.0.content.0.type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools.0.function"),
    ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"input": "hi", "max_output_tokens": 5000}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objectx"}}}},
     "text.format"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"input": "hi", "tools": [{**WEATHER, "parameters": {"type": "objectx"}}], "tool_choice": "required"},
     "tool_choice"),  # as at /v1/chat/completions: the forced call's schema
    ({"input": "hi", "tools": [WEATHER]}, "tool_choice"),  # auto needs --tool-call-parser
    ({"input": "hi", "model": "nope"}, "model"),
    ({"input": [{"type": "reasoning", "content": True}]}, "input.0.content"),  # was a 500
    ({"input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": 6}, "top_logprobs"),
    ({"input": "hi", "include": ["message.output_text.logprobs"], "tools": [WEATHER], "tool_choice": "required"},
     "include"),
    ({"input": "hi", "include": ["web_search_call.action.sources"]}, "include"),  # not in vLLM's list either
    ({"input": "hi", "min_p": 3}, "min_p"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]},
     "input"),  # a text-only model
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]},
     "input.0.content.0.image_url"),
    ({"input": "hi", "background": True}, "background"),  # no --responses-store-size here
    ({"input": "hi", "enable_response_messages": True}, "enable_response_messages"),
    ({"input": "hi", "previous_response": {"id": "resp_1"}}, "previous_response"),
    ({"input": "hi", "previous_input_messages": [{"role": "user", "content": "x"}]}, "previous_input_messages"),
    ({"input": [{"type": "reasoning", "encrypted_content": "gAAA", "summary": []}]}, "input.0.encrypted_content"),
    ({"input": "hi", "max_tool_calls": -1}, "max_tool_calls"),
    ({"input": "hi", "service_tier": "turbo"}, "service_tier"),
    ({"input": "hi", "logit_bias": {"1": 500}}, "logit_bias"),  # the chat path's check, same name
])
def test_bad_requests_are_400_naming_the_field(http, body, param):
    r = http.post("/v1/responses", json=body)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"]
    # the engine keeps serving
    assert _post(http, input="hi", max_output_tokens=2)["status"] in ("completed", "incomplete")
