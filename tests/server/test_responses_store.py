"""The responses store (``--responses-store-size``) rebuilds a conversation from its stored
turns; a failed response (a stream that ended in ``response.failed``: its items partial) is
stored for GET but continues nothing: naming it as ``previous_response_id`` is a 400 that names
it and the turn to retry from."""

from __future__ import annotations

import pytest

from tessellm.entrypoints.openai.errors import OpenAIError
from tessellm.entrypoints.openai.responses.store import ResponseStore, StoredResponse


def _user(text: str) -> dict:
    return {"type": "message", "role": "user", "content": text}


def _said(text: str) -> dict:
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}


def _store() -> ResponseStore:
    store = ResponseStore(8)
    store.put("resp_1", StoredResponse([_user("Hi")], {"status": "completed", "output": [_said("Hello")]}, None))
    failed = {"status": "failed", "output": [_said("Half a sen")],
              "error": {"code": "server_error", "message": "Internal server error"}}
    store.put("resp_2", StoredResponse([_user("Tell me more")], failed, "resp_1"))
    store.put("resp_3", StoredResponse([_user("Once more")], dict(failed), None))
    return store


def test_a_completed_chain_is_its_turns_in_order():
    assert _store().history("resp_1") == [_user("Hi"), _said("Hello")]


@pytest.mark.parametrize("failed,retry", [
    ("resp_2", "continue from the last completed response, 'resp_1'"),
    ("resp_3", "send that turn again without previous_response_id"),
])
def test_a_failed_response_is_not_continued(failed, retry):
    with pytest.raises(OpenAIError) as info:
        _store().history(failed)
    err = info.value
    assert (err.status, err.param, err.code) == (400, "previous_response_id", "previous_response_failed")
    assert err.message.startswith(f"Previous response {failed!r} failed (Internal server error): its "
                                  "output is partial and cannot be continued; "), err.message
    assert retry in err.message


def test_a_failed_response_whose_earlier_turn_was_dropped_names_no_turn_to_continue():
    """The retry hint names only a turn that is still stored (the least recently used goes
    first): with resp_1 dropped, continuing from it would be a previous_response_not_found."""
    store = _store()
    store.delete("resp_1")
    with pytest.raises(OpenAIError) as info:
        store.history("resp_2")
    assert "'resp_1', is no longer stored: send the conversation in input" in info.value.message
    assert "continue from" not in info.value.message
