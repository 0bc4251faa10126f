"""/v1/responses without a server: input items as the chat messages they mean, chat-path errors
renamed into this API's fields, and the item builder's events (parsed strictly by the openai
package's types) for interleaved pieces. End to end: tests/server/test_responses_*.py."""

from __future__ import annotations

import random

import pytest
from pydantic import TypeAdapter

from openai.types.responses import ResponseOutputItem, ResponseStreamEvent
from tessellm.entrypoints.openai.errors import OpenAIError
from tessellm.entrypoints.openai.responses.input import check_unsupported, rename_error, to_chat_request
from tessellm.entrypoints.openai.sampling import reasoning_template_kwargs
from tessellm.entrypoints.openai.responses.items import ItemBuilder
from tessellm.entrypoints.openai.responses.protocol import ResponsesRequest

EVENTS = TypeAdapter(ResponseStreamEvent)
ITEMS = TypeAdapter(ResponseOutputItem)


def _chat(**body):
    return to_chat_request(ResponsesRequest.model_validate(body))


def test_items_become_chat_messages():
    req = _chat(instructions="Be brief.", max_output_tokens=7, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "think"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "r1"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "r2"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "done"}]}],
        text={"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}},
        reasoning={"effort": "high"}, tools=[{"type": "function", "name": "f"}, {"type": "function", "name": "g"}],
        tool_choice={"type": "function", "name": "g"})
    roles = [m.role for m in req.messages]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert req.messages[1].content == "a\nb"
    calls = req.messages[2]
    assert calls.reasoning == "think" and [c.id for c in calls.tool_calls] == ["c1", "c2"]
    assert [(m.tool_call_id, m.content) for m in req.messages[3:5]] == [("c1", "r1"), ("c2", "r2")]
    assert req.messages[5].content == "done" and req.messages[5].reasoning is None
    assert req.max_completion_tokens == 7 and req.reasoning_effort == "high"
    assert req.response_format.json_schema.json_schema == {"type": "object"}
    assert req.tool_choice == {"type": "function", "function": {"name": "g"}}
    assert [t.function.name for t in req.tools] == ["f", "g"]


def test_a_call_after_an_assistant_message_joins_it():
    req = _chat(input=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "let me look"},
                       {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}])
    assert [m.role for m in req.messages] == ["user", "assistant"]
    assert req.messages[1].content == "let me look" and req.messages[1].tool_calls[0].id == "c"


@pytest.mark.parametrize("effort,thinks", [("none", False), ("minimal", True), ("xhigh", True), ("max", True)])
def test_every_reasoning_effort_of_the_chat_path_is_taken(effort, thinks):
    """reasoning.effort takes what the chat request's reasoning_effort takes (the openai
    package's values), with its enable_thinking rule ("none" turns Qwen 3's thinking off); only
    gpt-oss's template refuses the levels it lacks, named in this API's words."""
    body = ResponsesRequest.model_validate({"input": "hi", "reasoning": {"effort": effort}})
    check_unsupported(body)
    req = to_chat_request(body)
    assert req.reasoning_effort == effort
    kwargs = reasoning_template_kwargs(req, {}, harmony=False)
    assert kwargs == {"reasoning_effort": effort, "enable_thinking": thinks}
    with pytest.raises(OpenAIError) as info:
        reasoning_template_kwargs(req, {}, harmony=True)
    renamed = rename_error(info.value)
    assert renamed.param == "reasoning.effort" and f"reasoning.effort {effort!r}" in renamed.message


def test_chat_errors_say_this_apis_fields():
    exc = rename_error(OpenAIError("Reduce the prompt or max_completion_tokens.", 400, "max_completion_tokens"))
    assert (exc.message, exc.param) == ("Reduce the prompt or max_output_tokens.", "max_output_tokens")
    exc = rename_error(OpenAIError("bad schema", 400, "response_format.json_schema.schema"))
    assert exc.param == "text.format.schema"
    assert rename_error(OpenAIError("x", 400, "tools.2.function.parameters")).param == "tools.2.parameters"
    assert rename_error(OpenAIError("x", 400, "messages.3.content")).param == "input.content"


@pytest.mark.parametrize("item,param", [
    ({"type": "reasoning", "content": True}, "input.0.content"),  # was a TypeError (a 500)
    ({"type": "reasoning", "summary": 2.5}, "input.0.summary"),
    ({"type": "reasoning", "content": [{"type": "reasoning_text"}]}, "input.0.content")])
def test_a_malformed_reasoning_item_is_a_400(item, param):
    with pytest.raises(OpenAIError) as exc:
        _chat(input=[item])
    assert exc.value.status == 400 and exc.value.param == param


def test_random_items_are_400s_never_another_error():
    """Random item shapes: each is a chat request or an OpenAIError 400, nothing else."""
    rng = random.Random(0)
    values = [None, 1, "x", [], {}, [1], ["a"], [{}], True, 2.5, {"type": "input_text", "text": 3},
              {"type": "input_image"}, [{"type": "input_text", "text": "a"}], [{"text": "r"}], "message",
              "function_call", "function_call_output", "reasoning", "user", "assistant"]
    keys = ["type", "role", "content", "call_id", "name", "arguments", "output", "summary", "id", "text"]
    for _ in range(3000):
        items = [{k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, 6))} for _ in range(rng.randint(1, 3))]
        try:
            _chat(input=items)
        except OpenAIError as exc:
            assert exc.status == 400 and exc.param, items


def _check(events: list[dict]) -> list:
    parsed = [EVENTS.validate_python({**e, "sequence_number": i}) for i, e in enumerate(events)]
    return [e.type for e in parsed]


def test_builder_events_and_items():
    b = ItemBuilder()
    events = b.reasoning("th") + b.reasoning("ink") + b.text("Hel") + b.call(0, "call_a", "f", '{"a"')
    events += b.call(1, "call_b", "g", "") + b.call(0, None, None, ": 1}") + b.call(1, None, None, "{}")
    events += b.finish("incomplete")
    kinds = _check(events)
    assert kinds[:5] == ["response.output_item.added", "response.content_part.added",
                         "response.reasoning_text.delta", "response.reasoning_text.delta",
                         "response.reasoning_text.done"]
    assert [i.type for i in b.items] == ["reasoning", "message", "function_call", "function_call"]
    assert b.items[0].content[0].text == "think" and b.items[1].content[0].text == "Hel"
    assert (b.items[2].arguments, b.items[3].arguments) == ('{"a": 1}', "{}")
    # both calls stay open until the end; the cut marks them incomplete, earlier items completed
    assert [i.status for i in b.items] == ["completed", "completed", "incomplete", "incomplete"]
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["output_index"] for e in done] == [0, 1, 2, 3]
    for e in done:
        ITEMS.validate_python(e["item"])
    args = [e for e in events if e["type"] == "response.function_call_arguments.delta" and e["output_index"] == 2]
    assert "".join(e["delta"] for e in args) == '{"a": 1}'


@pytest.mark.parametrize("status", ["completed", "incomplete"])
def test_empty_output_is_one_empty_message(status):
    b = ItemBuilder()
    kinds = _check(b.finish(status))
    assert kinds == ["response.output_item.added", "response.content_part.added", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done"]
    assert b.items[0].content[0].text == "" and b.items[0].status == status
