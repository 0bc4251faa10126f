"""/v1/responses with ``--reasoning-parser deepseek_r1`` and ``--tool-call-parser hermes`` on the
tiny thinking model of ``thinking_model.py`` (greedy output known token for token): the thinking
is a ``reasoning`` item and the answer a ``message``, whole and streamed; with tools and
tool_choice "auto" a ``<tool_call>`` written while thinking stays in the reasoning (no
function_call item)."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import TypeAdapter

from openai.types.responses import Response, ResponseStreamEvent
from tests.server.responses_events import check_stream
from tests.server.thinking_model import TOOL_IN_THOUGHT, make_thinking_model

EVENTS = TypeAdapter(ResponseStreamEvent)
TOOL = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def srv(server_factory, tmp_path_factory):
    path = make_thinking_model(str(tmp_path_factory.mktemp("thinking_responses") / "m"))
    return server_factory([path, "--served-model-name", "m", "--reasoning-parser", "deepseek_r1",
                           "--tool-call-parser", "hermes"])


def _body(trigger, **body):
    return {"model": "m", "input": trigger, "max_output_tokens": 24, "temperature": 0, **body}


def _both(srv, trigger, **body):
    """(the whole response, the final response of the same request streamed, the stream's events)."""
    r = httpx.post(f"{srv.url}/v1/responses", json=_body(trigger, **body), headers=srv.headers, timeout=120)
    assert r.status_code == 200, r.text
    whole = Response.model_validate(r.json())
    events = []
    with httpx.stream("POST", f"{srv.url}/v1/responses", json=_body(trigger, stream=True, **body),
                      headers=srv.headers, timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(EVENTS.validate_python(json.loads(line[6:])))
    check_stream(events)  # OpenAI's event order, item by item
    return whole, events[-1].response, events


def _content(items) -> list:
    return [(i.type, i.content[0].text if i.type != "function_call" else i.arguments) for i in items]


@pytest.mark.parametrize("body", [{}, {"tools": [TOOL], "tool_choice": "auto"}])
def test_thinking_is_a_reasoning_item(srv, body):
    whole, streamed, events = _both(srv, "[think]", **body)
    assert _content(whole.output) == [("reasoning", " Let me see. Two and two."), ("message", " It is four.")]
    assert _content(streamed.output) == _content(whole.output) and whole.status == streamed.status == "completed"
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == " Let me see. Two and two." and "<think>" not in deltas


def test_a_call_written_while_thinking_is_not_a_function_call(srv):
    whole, streamed, _ = _both(srv, "[tool]", tools=[TOOL], tool_choice="auto")
    assert _content(whole.output) == [("reasoning", " Maybe" + TOOL_IN_THOUGHT + " No, later."),
                                      ("message", " It is four.")]
    assert _content(streamed.output) == _content(whole.output)


def test_include_reasoning_false_drops_the_reasoning_item(srv):
    """vLLM's include_reasoning: false: the thinking is generated (the same answer, the same
    output token count) but no reasoning item is sent, whole or streamed."""
    with_it, _, _ = _both(srv, "[think]")
    whole, streamed, events = _both(srv, "[think]", include_reasoning=False)
    assert _content(whole.output) == _content(streamed.output) == [("message", " It is four.")]
    assert whole.usage.output_tokens == with_it.usage.output_tokens
    assert not [e for e in events if e.type.startswith("response.reasoning")]
