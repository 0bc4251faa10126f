"""Ready means warm, huge requests never stall others, SIGTERM drains.

One extra server (own process) with the default 4 MiB body limit: 2 MB prompts pass the body
limit and must be refused without stalling a concurrent stream; then it is sent SIGTERM while
8 streams and a background response run: the drain waits for all of them, and the background
response is still read with GET /v1/responses/{id} meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import MODEL

BIG = "hello " * (2_000_000 // 6)  # ~2 MB of text: far over the context, under the 4 MiB body limit


@pytest.fixture(scope="module")
def own_server(server_factory):
    return server_factory(["--max-request-body-bytes", str(4 << 20), "--shutdown-timeout", "120",
                           "--responses-store-size", "4"])


def _stream(srv, max_tokens: int, out: dict, first: threading.Event = None) -> None:
    """One streamed completion: its chunk arrival times, tokens, finish reason."""
    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    times, reason, usage = [], None, None
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, headers=srv.headers,
                      timeout=300) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                times.append(time.perf_counter())
                reason = event["choices"][0].get("finish_reason") or reason
                if first is not None:
                    first.set()
            usage = event.get("usage") or usage
    out.update(times=times, finish_reason=reason, usage=usage)


def _p99_gap(times: list[float]) -> float:
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]


async def _big_posts(srv, n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=120) as c:
        rs = await asyncio.gather(*[c.post("/v1/completions", json={"model": MODEL, "prompt": BIG,
                                                                    "max_tokens": 4})
                                    for _ in range(n)])
    return [r.status_code for r in rs]


def test_huge_prompts_refused_without_stalling_a_stream(own_server):
    alone: dict = {}
    _stream(own_server, 40, alone)
    loaded: dict = {}
    first = threading.Event()
    t = threading.Thread(target=_stream, args=(own_server, 40, loaded, first))
    t.start()
    assert first.wait(120)
    statuses = asyncio.run(_big_posts(own_server, 10))
    t.join(300)
    assert set(statuses) <= {400, 413} and len(statuses) == 10, statuses
    assert loaded["usage"]["completion_tokens"] == 40
    # The stall this guards against is tokenizing a BIG prompt on the event loop: ~3 s each on
    # this 2-core machine (longer under load). Parsing ten 2 MB bodies does run on the loop (~20
    # ms each; a gap of 0.58 s with the machine's load at 8), so the bound leaves room for that
    # and stays at half a tokenization.
    base, with_big = _p99_gap(alone["times"]), _p99_gap(loaded["times"])
    assert with_big < max(3 * base, 1.5), (base, with_big)


def test_sigterm_drains_streams_and_refuses_new_requests(own_server):
    results = [dict() for _ in range(9)]
    firsts = [threading.Event() for _ in range(9)]
    lengths = [24] * 8 + [400]  # the last outlasts the background response: the server is up to read it
    threads = [threading.Thread(target=_stream, args=(own_server, lengths[i], results[i], firsts[i]))
               for i in range(9)]
    for t in threads:
        t.start()
    assert all(f.wait(180) for f in firsts)
    background = httpx.post(f"{own_server.url}/v1/responses", headers=own_server.headers, timeout=30, json={
        "model": MODEL, "input": "Count slowly:", "max_output_tokens": 160, "ignore_eos": True,
        "temperature": 0, "background": True}).json()
    own_server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60  # the signal handled: draining (not a fixed sleep: load)
    while httpx.get(f"{own_server.url}/ready", timeout=30).status_code != 503:
        assert time.monotonic() < deadline, "the server did not start draining on SIGTERM"
        time.sleep(0.05)
    r = httpx.post(f"{own_server.url}/v1/completions", headers=own_server.headers, timeout=30,
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
    # the background response runs on through the drain, and its client can still read it
    deadline = time.monotonic() + 300
    while True:
        got = httpx.get(f"{own_server.url}/v1/responses/{background['id']}", headers=own_server.headers, timeout=30)
        assert got.status_code == 200, got.text
        if got.json()["status"] not in ("queued", "in_progress"):
            break
        assert time.monotonic() < deadline, "the background response never finished"
        time.sleep(0.05)
    assert got.json()["status"] == "incomplete" and got.json()["usage"]["output_tokens"] == 160, got.text
    for t in threads:
        t.join(300)
    for res, length in zip(results, lengths):
        assert res["status"] == 200 and res["finish_reason"] == "length", res
        assert res["usage"]["completion_tokens"] == length
    assert own_server.proc.wait(60) == 0, own_server.log_tail()
