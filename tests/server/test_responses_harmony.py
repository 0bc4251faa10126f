"""/v1/responses on gpt-oss's harmony format: a real server on the tiny bigram gpt-oss of
``harmony_model.py`` (greedy output known token for token). The analysis channel is a
``reasoning`` item, the final channel a ``message``, a commentary call a ``function_call`` item,
whole and streamed (the stream's events, parsed strictly by the openai package's types, build
the same items); a cut call is ``incomplete``; an earlier reasoning item, call and output reach
the prompt as at /v1/chat/completions. Background responses (this server keeps responses): run
on after a ``queued`` answer, read back whole or as a stream resumed after a sequence number."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from pydantic import TypeAdapter

from openai.types.responses import Response, ResponseStreamEvent
from tests.server.harmony_model import make_harmony_model
from tests.server.responses_events import check_stream

EVENTS = TypeAdapter(ResponseStreamEvent)
STORE_SIZE = 4
TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture(scope="module")
def srv(server_factory, tmp_path_factory):
    path = make_harmony_model(str(tmp_path_factory.mktemp("harmony_responses") / "m"))
    return server_factory([path, "--served-model-name", "m", "--max-model-len", "512",
                           "--responses-store-size", str(STORE_SIZE)])


def _body(input, **body):
    return {"model": "m", "input": input, "max_output_tokens": 16, "temperature": 0, **body}


def _post(srv, input, **body) -> dict:
    r = httpx.post(f"{srv.url}/v1/responses", json=_body(input, **body), headers=srv.headers, timeout=120)
    assert r.status_code == 200, r.text
    Response.model_validate(r.json())
    return r.json()


def _stream(srv, input, **body) -> list:
    events = []
    with httpx.stream("POST", f"{srv.url}/v1/responses", json=_body(input, stream=True, **body),
                      headers=srv.headers, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(EVENTS.validate_python(json.loads(line[6:])))
    check_stream(events)  # OpenAI's event order, item by item
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def _shape(items: list) -> list:
    """Items without their random ids."""
    drop = {"id", "call_id"}
    return [{k: v for k, v in (i if isinstance(i, dict) else i.model_dump(exclude_none=True)).items()
             if k not in drop and v is not None} for i in items]


def _same_when_streamed(srv, whole: dict, input, **body):
    events = _stream(srv, input, **body)
    final = events[-1]
    assert final.type == f"response.{whole['status']}"
    assert _shape(final.response.output) == _shape(whole["output"])
    # the item events rebuild every item: added (empty) -> deltas -> done (= the final item)
    for i, item in enumerate(final.response.output):
        mine = [e for e in events if getattr(e, "output_index", None) == i]
        assert mine[0].type == "response.output_item.added" and mine[-1].type == "response.output_item.done"
        assert mine[-1].item == item
        deltas = "".join(e.delta for e in mine if e.type.endswith(".delta"))
        text = item.arguments if item.type == "function_call" else item.content[0].text
        assert deltas == text
        assert "<|" not in deltas  # no harmony marker leaks
    return events


def test_analysis_is_a_reasoning_item_and_final_a_message(srv):
    r = _post(srv, "[final]")
    assert [i["type"] for i in r["output"]] == ["reasoning", "message"]
    reasoning, message = r["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": " Two and two."}]
    assert reasoning["summary"] == [] and reasoning["id"].startswith("rs_")
    assert message["content"][0]["text"] == "It is four." and message["status"] == "completed"
    assert r["status"] == "completed" and r["usage"]["output_tokens"] == 11
    assert 0 < r["usage"]["output_tokens_details"]["reasoning_tokens"] < 11
    events = _same_when_streamed(srv, r, "[final]")
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.reasoning_text.delta"]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")


def test_an_effort_gpt_oss_lacks_is_a_400_naming_reasoning_effort(srv):
    r = httpx.post(f"{srv.url}/v1/responses", json=_body("hi", reasoning={"effort": "minimal"}),
                   headers=srv.headers, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "reasoning.effort"
    assert "gpt-oss's levels" in r.json()["error"]["message"]


def test_commentary_call_is_a_function_call_item(srv):
    r = _post(srv, "[tool]", tools=[TOOL])
    assert [i["type"] for i in r["output"]] == ["reasoning", "function_call"]
    call = r["output"][1]
    assert call["name"] == "get_weather" and call["arguments"] == '{"city": "Paris"}'
    assert call["call_id"].startswith("call_") and call["status"] == "completed"
    assert r["status"] == "completed" and r["tool_choice"] == "auto"
    events = _same_when_streamed(srv, r, "[tool]", tools=[TOOL])
    assert "response.function_call_arguments.done" in [e.type for e in events]


def test_call_cut_by_max_output_tokens_is_incomplete(srv):
    r = _post(srv, "[tool]", tools=[TOOL], max_output_tokens=4)
    assert r["status"] == "incomplete" and r["incomplete_details"] == {"reason": "max_output_tokens"}
    call = r["output"][-1]
    assert call["type"] == "function_call" and call["arguments"] == '{"city":' and call["status"] == "incomplete"
    assert r["output"][0]["status"] == "completed"
    _same_when_streamed(srv, r, "[tool]", tools=[TOOL], max_output_tokens=4)


def test_earlier_reasoning_call_and_output_reach_the_prompt(srv):
    """The items a response returned, sent back with the call's output, render the prompt the
    chat path renders for the same turn (the same token count), and the model answers."""
    first = _post(srv, "[tool]", tools=[TOOL])
    turn = [{"role": "user", "content": "Weather in Paris?"}, *first["output"],
            {"type": "function_call_output", "call_id": first["output"][1]["call_id"], "output": "[after_tool]"}]
    r = _post(srv, turn, tools=[TOOL], reasoning={"effort": "high"}, max_output_tokens=8)
    assert [i["type"] for i in r["output"]] == ["message"]
    assert r["output"][0]["content"][0]["text"] == "It is four."
    assert r["reasoning"]["effort"] == "high"
    call_id = first["output"][1]["call_id"]
    chat = httpx.post(f"{srv.url}/v1/chat/completions", headers=srv.headers, timeout=120, json={
        "model": "m", "temperature": 0, "max_tokens": 8, "reasoning_effort": "high",
        "tools": [{"type": "function", "function": {k: TOOL[k] for k in ("name", "description", "parameters")}}],
        "messages": [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": "", "reasoning": " Need the weather.",
                      "tool_calls": [{"id": call_id, "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                     {"role": "tool", "tool_call_id": call_id, "content": "[after_tool]"}]}).json()
    assert r["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    without = _post(srv, [turn[0], turn[2], turn[3]], tools=[TOOL], reasoning={"effort": "high"}, max_output_tokens=8)
    assert without["usage"]["input_tokens"] < r["usage"]["input_tokens"]  # the thinking was rendered


def test_previous_response_id_continues_a_stored_turn(srv):
    """Turn 1 calls the tool (streamed: kept at its end); turn 2 sends only the call's output
    with previous_response_id: the same prompt as sending every item, and the same answer."""
    events = _stream(srv, "[tool]", tools=[TOOL])
    first = events[-1].response
    assert first.store is True
    call_id = first.output[1].call_id
    out = {"type": "function_call_output", "call_id": call_id, "output": "[after_tool]"}
    r = _post(srv, [out], previous_response_id=first.id, tools=[TOOL], reasoning={"effort": "high"},
              max_output_tokens=8)
    assert r["previous_response_id"] == first.id and r["output"][0]["content"][0]["text"] == "It is four."
    items = [{"role": "user", "content": "[tool]"}, *[i.model_dump(exclude_none=True) for i in first.output], out]
    explicit = _post(srv, items, tools=[TOOL], reasoning={"effort": "high"}, max_output_tokens=8, store=False)
    assert explicit["store"] is False and r["usage"]["input_tokens"] == explicit["usage"]["input_tokens"]
    # a chain of three: the second turn's own output and the first's both reach the prompt
    third = _post(srv, "[final]", previous_response_id=r["id"], tools=[TOOL])
    assert third["usage"]["input_tokens"] > r["usage"]["input_tokens"]
    got = httpx.get(f"{srv.url}/v1/responses/{r['id']}", headers=srv.headers, timeout=30)
    assert got.status_code == 200 and got.json() == r
    Response.model_validate(got.json())


def test_store_false_delete_and_eviction(srv):
    kept = _post(srv, "[final]")
    gone = _post(srv, "[final]", store=False)
    assert httpx.get(f"{srv.url}/v1/responses/{gone['id']}", headers=srv.headers).status_code == 404
    r = httpx.post(f"{srv.url}/v1/responses", headers=srv.headers, json=_body("[final]", previous_response_id=gone["id"]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "previous_response_not_found"
    d = httpx.delete(f"{srv.url}/v1/responses/{kept['id']}", headers=srv.headers)
    assert d.status_code == 200 and d.json() == {"id": kept["id"], "object": "response", "deleted": True}
    assert httpx.get(f"{srv.url}/v1/responses/{kept['id']}", headers=srv.headers).status_code == 404
    oldest = _post(srv, "[final]")
    for _ in range(STORE_SIZE):  # the store keeps the last STORE_SIZE responses
        _post(srv, "[plain]")
    r = httpx.post(f"{srv.url}/v1/responses", headers=srv.headers, json=_body("[final]", previous_response_id=oldest["id"]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    assert f"last {STORE_SIZE} responses" in r.json()["error"]["message"]


# -- background responses (vLLM's background / retrieve / cancel) ------------------------------

def _get(srv, rid: str, **params) -> httpx.Response:
    return httpx.get(f"{srv.url}/v1/responses/{rid}", params=params, headers=srv.headers, timeout=120)


def _until_done(srv, rid: str) -> dict:
    for _ in range(1200):
        r = _get(srv, rid)
        assert r.status_code == 200, r.text
        if r.json()["status"] not in ("queued", "in_progress"):
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"{rid} never finished: {r.json()['status']}")


def test_background_response_runs_on_and_is_retrieved(srv):
    """background: answered queued at once; GET follows it to the same items a foreground
    request gets."""
    fg = _post(srv, "[final]")
    r = _post(srv, "[final]", background=True)
    assert r["status"] == "queued" and r["background"] is True and r["output"] == [] and r["store"] is True
    done = _until_done(srv, r["id"])
    Response.model_validate(done)
    assert done["status"] == "completed" and done["background"] is True
    assert _shape(done["output"]) == _shape(fg["output"]) and done["usage"]["output_tokens"] == 11


def test_background_stream_is_resumed_after_a_sequence_number(srv):
    """background + stream: the POST streams the events; GET ?stream=true&starting_after=N
    replays those after N (vLLM's resume), the same events to the last."""
    events = _stream(srv, "[final]", background=True)
    assert events[-1].type == "response.completed" and events[-1].response.background is True
    rid = events[-1].response.id
    replay = []
    with httpx.stream("GET", f"{srv.url}/v1/responses/{rid}", params={"stream": "true", "starting_after": 2},
                      headers=srv.headers, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                replay.append(EVENTS.validate_python(json.loads(line[6:])))
    assert replay == events[3:]
    assert _get(srv, rid).json()["status"] == "completed"
    for made in (_post(srv, "[final]"), _post(srv, "[final]", background=True)):  # no events recorded
        r = _get(srv, made["id"], stream="true")
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text
    bad = httpx.post(f"{srv.url}/v1/responses", headers=srv.headers, json=_body("[final]", background=True, store=False))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "background"


def test_background_stream_resumed_past_its_end_is_a_400(srv):
    """A finished background stream resumed after its last event is empty; after more than that
    (nothing would ever come) a 400 naming starting_after and the last sequence number."""
    events = _stream(srv, "[final]", background=True)
    rid, last = events[-1].response.id, events[-1].sequence_number
    with httpx.stream("GET", f"{srv.url}/v1/responses/{rid}", params={"stream": "true", "starting_after": last},
                      headers=srv.headers, timeout=120) as r:
        assert r.status_code == 200
        assert [line for line in r.iter_lines() if line.startswith("data: ")] == []
    r = _get(srv, rid, stream="true", starting_after=last + 1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "starting_after", r.text
    assert f"last event is sequence number {last}" in r.json()["error"]["message"]


def test_unknown_id_404_says_responses_stay_on_their_replica(srv):
    """A GET for an id this server never stored (with Ray Serve: one another replica made)."""
    for r in (_get(srv, "resp_elsewhere"), _get(srv, "resp_elsewhere", stream="true"),
              httpx.post(f"{srv.url}/v1/responses/resp_elsewhere/cancel", headers=srv.headers, timeout=120)):
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
        assert f"keeps the last {STORE_SIZE} responses" in r.json()["error"]["message"]
        assert "another replica's responses are not here" in r.json()["error"]["message"]


def test_leaving_a_background_stream_does_not_stop_it(srv):
    """The POST's client goes after three events: the run goes on, and a resume from the start
    replays those three then the rest, to response.completed (OpenAI's order throughout)."""
    seen = []
    with httpx.stream("POST", f"{srv.url}/v1/responses", json=_body("[final]", stream=True, background=True),
                      headers=srv.headers, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen.append(EVENTS.validate_python(json.loads(line[6:])))
                if len(seen) == 3:
                    break
    rid = seen[0].response.id
    replay = []
    with httpx.stream("GET", f"{srv.url}/v1/responses/{rid}", params={"stream": "true"}, headers=srv.headers,
                      timeout=120) as r:
        assert r.status_code == 200
        replay = [EVENTS.validate_python(json.loads(line[6:])) for line in r.iter_lines() if line.startswith("data: ")]
    assert replay[:3] == seen and replay[-1].type == "response.completed"
    check_stream(replay)
    assert _until_done(srv, rid)["status"] == "completed"
