"""A request the engine fails (vLLM's finish reason "error": here a custom logits processor
raises while a request sampled at a poisoned temperature is in the step) at the routes whose
requests carry no ``vllm_xargs``: /v1/responses and beam search (``use_beam_search``). Not
streamed, the client gets vLLM's HTTP 500 error object; streamed, /v1/responses ends with vLLM's
``error`` event then OpenAI's ``response.failed`` (status "failed" with an error; stored, so
GET answers it, but it cannot be continued), beam search with the error object then
``[DONE]``. The next request is served. A background response (``background: true``) that
fails is stored ``failed``; one cancelled while it runs stops its engine request and reads
``cancelled``."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from pydantic import TypeAdapter

from tests.sampling.failing_procs import POISON_TEMPERATURE
from tests.server.conftest import MODEL
from tests.server.responses_events import check_stream

INTERNAL_ERROR = {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None,
                            "code": 500}}
ASK = {"model": MODEL, "input": "Name a fruit.", "max_output_tokens": 4}
BEAM = {"model": MODEL, "use_beam_search": True, "n": 2, "max_tokens": 3}
BEAM_ROUTES = [("/v1/completions", {"prompt": "Hi"}),
               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]


@pytest.fixture(scope="module")
def http(server_factory):
    srv = server_factory(["--logits-processors", "tests.sampling.failing_procs:PoisonedTemperatureProcessor",
                          "--responses-store-size", "8"])
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=300) as client:
        yield client


def _served(http) -> None:
    r = http.post("/v1/responses", json={**ASK, "temperature": 0})
    assert r.status_code == 200 and r.json()["status"] in ("completed", "incomplete"), r.text


def test_responses_failed_is_vllms_500(http):
    r = http.post("/v1/responses", json={**ASK, "temperature": POISON_TEMPERATURE})
    assert r.status_code == 500, r.text
    assert r.json() == INTERNAL_ERROR
    _served(http)


def test_responses_failed_stream_ends_with_error_then_response_failed(http):
    from openai.types.responses import ResponseStreamEvent

    events, kinds = [], []
    body = {**ASK, "temperature": POISON_TEMPERATURE, "stream": True}
    with http.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                kinds.append(line[7:])
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert [e["type"] for e in events] == kinds
    assert kinds == ["response.created", "response.in_progress", "error", "response.failed"], kinds
    assert [e["sequence_number"] for e in events] == list(range(4))
    parse = TypeAdapter(ResponseStreamEvent).validate_python
    check_stream([parse(e) for e in events])
    error, failed = parse(events[2]), parse(events[3])  # the SDK's own event models read them
    assert (error.code, error.message) == ("500", "Internal server error")
    assert failed.response.status == "failed" and failed.response.id == events[0]["response"]["id"]
    assert (failed.response.error.code, failed.response.error.message) == ("server_error", "Internal server error")
    stored = http.get(f"/v1/responses/{failed.response.id}")  # kept (store defaults to true), as OpenAI
    assert stored.status_code == 200, stored.text
    assert stored.json() == events[3]["response"]
    _served(http)
    # its items are partial: it continues nothing (a 400 naming it and what to do instead)
    r = http.post("/v1/responses", json={**ASK, "temperature": 0, "previous_response_id": failed.response.id})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("previous_response_id", "previous_response_failed")
    assert f"Previous response '{failed.response.id}' failed" in error["message"]


@pytest.mark.parametrize("path,body", BEAM_ROUTES)
def test_beam_search_failed_is_vllms_500(http, path, body):
    r = http.post(path, json={**BEAM, **body, "temperature": POISON_TEMPERATURE})
    assert r.status_code == 500, r.text
    assert r.json() == INTERNAL_ERROR
    served = http.post(path, json={**BEAM, **body, "temperature": 0})
    assert served.status_code == 200 and len(served.json()["choices"]) == 2, served.text


def test_beam_search_failed_stream_ends_with_the_error_then_done(http):
    body = {**BEAM, "prompt": "Hi", "temperature": POISON_TEMPERATURE, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[-2]) == INTERNAL_ERROR
    assert all("error" not in json.loads(d) for d in data[:-2])
    _served(http)


def _until_done(http, rid: str) -> dict:
    for _ in range(2400):
        body = http.get(f"/v1/responses/{rid}").json()
        if body["status"] not in ("queued", "in_progress"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"{rid} never finished: {body['status']}")


def test_background_failed_is_stored_failed(http):
    r = http.post("/v1/responses", json={**ASK, "temperature": POISON_TEMPERATURE, "background": True})
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text
    done = _until_done(http, r.json()["id"])
    assert done["status"] == "failed" and done["error"] == {"code": "server_error", "message": "Internal server error"}
    _served(http)


def test_background_cancel_stops_the_request(http):
    """cancel: a background response still running stops (its engine request aborted: the core
    runs nothing after) and reads cancelled; cancelling it again, or a response made without
    background, is a 400; continuing it is a 400 (while it ran: wait; cancelled: partial)."""
    long = {**ASK, "temperature": 0, "max_output_tokens": 900, "ignore_eos": True, "background": True}
    rid = http.post("/v1/responses", json=long).json()["id"]
    early = http.post("/v1/responses", json={**ASK, "temperature": 0, "previous_response_id": rid})
    assert early.status_code == 400 and early.json()["error"]["code"] == "previous_response_in_progress", early.text
    c = http.post(f"/v1/responses/{rid}/cancel")
    assert c.status_code == 200 and c.json()["status"] == "cancelled", c.text
    assert http.get(f"/v1/responses/{rid}").json()["status"] == "cancelled"
    stats = http.get("/debug/stats").json()  # /debug/stats asks the core: after the abort reached it
    assert stats["num_requests"] == 0 and stats["stats"]["num_running"] == 0, stats
    again = http.post(f"/v1/responses/{rid}/cancel")
    assert again.status_code == 400 and "that is cancelled" in again.json()["error"]["message"]
    later = http.post("/v1/responses", json={**ASK, "temperature": 0, "previous_response_id": rid})
    assert later.status_code == 400 and f"'{rid}' was cancelled" in later.json()["error"]["message"]
    sync = http.post("/v1/responses", json={**ASK, "temperature": 0}).json()
    refused = http.post(f"/v1/responses/{sync['id']}/cancel")
    assert refused.status_code == 400 and "without background" in refused.json()["error"]["message"]
    assert http.post("/v1/responses/resp_nope/cancel").status_code == 404
    _served(http)
