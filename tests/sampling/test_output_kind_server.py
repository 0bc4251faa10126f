"""The OpenAI server's output kinds, in process (the app over a real AsyncLLM and engine core
process; a tiny random llama with SmolLM2's tokenizer): a streamed request asks the engine for
DELTA outputs and one answered whole for FINAL_ONLY (its stream gets one output, the finished
one), as vLLM's server does; and a streamed answer adds up to the whole answer of the same
greedy request with a stop string, logprobs and n=2: text, logprobs (the echoed prompt's too),
finish and stop reasons, usage, and the --enable-log-outputs line."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from tessellm.config import EngineArgs
from tessellm.entrypoints.openai.server_config import ServerConfig
from tessellm.sampling_params import RequestOutputKind
from tests.server.in_process import serve

ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=256)
PROMPT = "Once upon a time there was"
GREEDY = dict(model="m", max_tokens=24, temperature=0, ignore_eos=True)
USAGE = {"include_usage": True, "continuous_usage_stats": True}


def _spy(engine) -> dict:
    """Each request's output kind as the engine got it, and how many outputs its stream was
    handed (the real ``add_request`` and ``put`` run)."""
    seen: dict = {}
    add = engine.add_request

    def add_request(request_id, prompt, params, *args, **kwargs):
        stream = add(request_id, prompt, params, *args, **kwargs)
        record = seen[request_id] = {"kind": params.output_kind, "outputs": 0}
        put = stream.put

        def counted(output):
            record["outputs"] += 1
            put(output)

        stream.put = counted
        return stream

    engine.add_request = add_request
    return seen


async def _events(c, path: str, body: dict) -> list[dict]:
    async with c.stream("POST", path, json={**body, "stream": True, "stream_options": USAGE}) as r:
        assert r.status_code == 200, await r.aread()
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def _stop_inside(text: str) -> str:
    """A stop string the greedy output reaches part-way."""
    assert len(text) > 16, text
    return text[8:12]


def _kinds(seen: dict) -> list[tuple]:
    return sorted((v["kind"], v["outputs"]) for v in seen.values())


async def _completions(c, engine):
    first = (await c.post("/v1/completions", json={**GREEDY, "prompt": PROMPT, "n": 2})).json()
    stop = _stop_inside(first["choices"][0]["text"])
    body = {**GREEDY, "prompt": PROMPT, "n": 2, "logprobs": 2, "echo": True, "stop": [stop]}
    seen = _spy(engine)
    whole = (await c.post("/v1/completions", json=body)).json()
    assert _kinds(seen) == [(RequestOutputKind.FINAL_ONLY, 1)]  # one output: the finished one
    seen.clear()
    events = await _events(c, "/v1/completions", body)
    ((kind, num_outputs),) = _kinds(seen)
    assert kind == RequestOutputKind.DELTA and num_outputs > 2
    streamed = {}
    for event in events[:-1]:
        (choice,) = event["choices"]
        got = streamed.setdefault(choice["index"], {"text": "", "tokens": [], "token_logprobs": [],
                                                    "top_logprobs": [], "text_offset": []})
        got["text"] += choice["text"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            got[key] += choice["logprobs"][key]
        if choice["finish_reason"] is not None:
            got["finish_reason"], got["stop_reason"] = choice["finish_reason"], choice["stop_reason"]
            got["usage"] = event["usage"]
    assert sorted(streamed) == [0, 1]
    for choice in whole["choices"]:
        got = streamed[choice["index"]]
        assert choice["finish_reason"] == got["finish_reason"] == "stop" and choice["stop_reason"] == stop
        assert got["stop_reason"] == stop and stop not in choice["text"][len(PROMPT):]
        assert got["text"] == choice["text"] and choice["text"].startswith(PROMPT)
        want = choice["logprobs"]
        assert (got["tokens"], got["text_offset"]) == (want["tokens"], want["text_offset"])
        assert got["token_logprobs"][0] is None is want["token_logprobs"][0]  # the prompt's first token
        assert got["token_logprobs"][1:] == pytest.approx(want["token_logprobs"][1:])
        assert got["top_logprobs"][1:] == [pytest.approx(t) for t in want["top_logprobs"][1:]]
        tokens = len(choice["logprobs"]["tokens"]) - whole["usage"]["prompt_tokens"]
        assert got["usage"]["completion_tokens"] == tokens  # continuous usage: this choice's so far
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    return whole


async def _chat(c, engine):
    messages = [{"role": "user", "content": PROMPT}]
    first = (await c.post("/v1/chat/completions", json={**GREEDY, "messages": messages, "n": 2})).json()
    stop = _stop_inside(first["choices"][0]["message"]["content"])
    body = {**GREEDY, "messages": messages, "n": 2, "logprobs": True, "top_logprobs": 2, "stop": [stop]}
    seen = _spy(engine)
    whole = (await c.post("/v1/chat/completions", json=body)).json()
    assert _kinds(seen) == [(RequestOutputKind.FINAL_ONLY, 1)]
    seen.clear()
    events = await _events(c, "/v1/chat/completions", body)
    assert [kind for kind, _ in _kinds(seen)] == [RequestOutputKind.DELTA]
    streamed = {}
    for event in events[:-1]:
        (choice,) = event["choices"]
        got = streamed.setdefault(choice["index"], {"content": "", "logprobs": []})
        got["content"] += choice["delta"].get("content") or ""
        got["logprobs"] += (choice.get("logprobs") or {}).get("content") or []
        if choice["finish_reason"] is not None:
            got["finish_reason"], got["stop_reason"] = choice["finish_reason"], choice["stop_reason"]
    for choice in whole["choices"]:
        got = streamed[choice["index"]]
        assert got["content"] == choice["message"]["content"] and stop not in got["content"]
        assert (got["finish_reason"], got["stop_reason"]) == ("stop", stop) == (choice["finish_reason"],
                                                                                 choice["stop_reason"])
        want = choice["logprobs"]["content"]
        assert [lp["token"] for lp in got["logprobs"]] == [lp["token"] for lp in want]
        assert [lp["logprob"] for lp in got["logprobs"]] == pytest.approx([lp["logprob"] for lp in want])
    assert events[-1]["usage"] == whole["usage"]


def test_server_asks_delta_and_final_only_and_streams_add_up(tokenized_model, caplog):
    async def scenario(c, engine):
        caplog.set_level(logging.INFO, logger="tessellm.requests")
        whole = await _completions(c, engine)
        await _chat(c, engine)
        return whole

    config = ServerConfig(["m"], log_outputs=True)
    whole = asyncio.run(serve(EngineArgs(model=tokenized_model, **ENGINE), scenario, with_engine=True,
                              config=config))
    # --enable-log-outputs: the streamed request's line holds its whole output, as the other's
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Generated response cmpl-")]
    generated = whole["choices"][0]["text"][len(PROMPT):]
    assert sum(f"output: {generated!r}," in line for line in lines) >= 4, lines  # 2 requests x n=2
