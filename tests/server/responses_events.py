"""The ordering rules of a /v1/responses stream, checked on the events a real server sent (already
parsed by the openai package's ``ResponseStreamEvent`` union): sequence numbers 0..n-1;
response.created and response.in_progress first, one terminal event last (response.failed right
after an ``error``); output items added at output_index 0, 1, 2, ... each with its events in
OpenAI's order (output_item.added, content_part.added, deltas, *.done, content_part.done,
output_item.done) naming its item_id; every item closed; deltas that add up to each done event's
text or arguments; and the final response's output equal to the items the stream closed."""

from __future__ import annotations

TERMINAL = {"response.completed", "response.incomplete", "response.failed"}
TEXT_DELTA = {"response.output_text.delta": "response.output_text.done",
              "response.reasoning_text.delta": "response.reasoning_text.done",
              "response.function_call_arguments.delta": "response.function_call_arguments.done"}


def check_stream(events: list) -> None:
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events))), kinds
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] in TERMINAL and not TERMINAL & set(kinds[:-1]), kinds
    assert kinds.count("error") == (1 if kinds[-1] == "response.failed" else 0), kinds
    if "error" in kinds:
        assert kinds.index("error") == len(kinds) - 2, kinds
    first = events[0].response
    assert first.output == [] and first.status in ("queued", "in_progress")
    assert all(e.response.id == first.id for e in events if e.type.startswith("response.") and hasattr(e, "response"))
    items: dict[int, dict] = {}  # output_index -> {"id", "stage", "text", "done"}
    for e in events[2:-1]:
        if e.type == "error":
            continue
        if e.type == "response.output_item.added":
            assert e.output_index == len(items), (e.output_index, len(items))
            assert e.item.status == "in_progress"
            items[e.output_index] = {"id": e.item.id, "type": e.item.type, "stage": "added", "text": "", "done": None}
            continue
        item = items.get(e.output_index)
        assert item is not None and item["done"] is None, (e.type, e.output_index)
        if e.type == "response.output_item.done":
            assert e.item.id == item["id"] and e.item.status in ("completed", "incomplete"), e
            if item["type"] != "function_call":
                assert item["stage"] == "part_done", (item, e.type)
            else:
                assert item["stage"] == "text_done", (item, e.type)
            item["done"] = e.item
            continue
        assert e.item_id == item["id"], (e.type, e.item_id, item["id"])
        if e.type == "response.content_part.added":
            assert item["stage"] == "added" and item["type"] != "function_call", (item, e.type)
            item["stage"] = "part"
        elif e.type in TEXT_DELTA:
            assert item["stage"] == ("added" if item["type"] == "function_call" else "part"), (item, e.type)
            item["text"] += e.delta
        elif e.type in TEXT_DELTA.values():
            assert item["stage"] == ("added" if item["type"] == "function_call" else "part"), (item, e.type)
            done = e.arguments if e.type == "response.function_call_arguments.done" else e.text
            assert done == item["text"], (e.type, done, item["text"])
            item["stage"] = "text_done"
        elif e.type == "response.content_part.done":
            assert item["stage"] == "text_done" and e.part.text == item["text"], (item, e)
            item["stage"] = "part_done"
        else:
            raise AssertionError(f"unexpected event {e.type}")
    assert all(i["done"] is not None for i in items.values()), items
    final = events[-1].response
    assert [i.model_dump() for i in final.output] == [items[k]["done"].model_dump() for k in range(len(items))]
    for k, item in items.items():
        done = item["done"]
        text = done.arguments if item["type"] == "function_call" else done.content[0].text
        assert text == item["text"], (k, text, item["text"])
    if kinds[-1] == "response.completed":
        assert all(i.status == "completed" for i in final.output), final.output
