"""Many clients at once: disconnects abort their requests (KV blocks freed at once, the others
go on), and concurrent greedy requests give the same outputs as one at a time."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"


def wait_idle(server, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()["stats"]
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"the engine is still busy: {stats}"
        time.sleep(0.1)


def test_disconnect_mid_stream_frees_kv(server):
    idle = wait_idle(server, 30)["kv_cache_usage"]

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.api_key,
                                      max_retries=0, timeout=120) as client:
            async def keeper(i):
                stream = await client.completions.create(
                    model=MODEL, prompt=f"Count with me, round {i}:", max_tokens=16, temperature=0,
                    stream=True, extra_body={"ignore_eos": True})
                chunks = [c async for c in stream]
                return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

            async def dropper(i):
                # would run ~1000 tokens if not aborted
                stream = await client.completions.create(
                    model=MODEL, prompt=f"Write a very long essay, part {i}:", max_tokens=1000,
                    temperature=0, stream=True, extra_body={"ignore_eos": True})
                received = 0
                async for chunk in stream:
                    received += bool(chunk.choices and chunk.choices[0].text)
                    if received >= 3:
                        break
                await stream.close()  # the client goes away mid-stream
                return received

            return await asyncio.gather(*[keeper(i) for i in range(4)], *[dropper(i) for i in range(4)])

    results = asyncio.run(run())
    kept, dropped = results[:4], results[4:]
    assert dropped == [3, 3, 3, 3]
    assert all(reason == "length" and text for text, reason in kept)
    # the dropped requests (1000 tokens each) were aborted, not left to run on
    stats = wait_idle(server, 15)
    assert stats["kv_cache_usage"] == idle
    # and the engine serves on, with the same outputs as before the disconnects
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0) as client:
        again = client.completions.create(model=MODEL, prompt="Count with me, round 0:", max_tokens=16,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert again.choices[0].text == kept[0][0]


def test_disconnect_non_streamed_request_aborts(server):
    wait_idle(server, 30)
    with pytest.raises(httpx.TimeoutException):  # the client gives up after 1.5 s
        httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=1.5,
                   json={"prompt": "An endless story:", "max_tokens": 1000, "ignore_eos": True})
    stats = wait_idle(server, 10)  # not the ~1000 steps the request had left
    assert stats["kv_cache_usage"] == 0.0


def test_32_concurrent_requests_match_sequential(server, client):
    topics = ["the sea", "a cat", "mountains", "coffee", "rain", "trains", "the moon", "bread",
              "music", "winter", "a garden", "books", "the city", "fire", "birds", "a river"]
    prompts = [f"Write one sentence about {topics[i % 16]}{'.' if i < 16 else ', please.'}" for i in range(32)]
    # four tokens (three batched decode steps): the 32 one-at-a-time requests are this test's time
    sequential = []
    for p in prompts:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                           max_tokens=4, temperature=0)
        sequential.append(r.choices[0].message.content)

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.api_key,
                                      max_retries=0, timeout=300) as c:
            async def one(p):
                r = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                                    max_tokens=4, temperature=0)
                return r.choices[0].message.content
            return await asyncio.gather(*[one(p) for p in prompts])

    concurrent = asyncio.run(run())
    assert concurrent == sequential
    assert server.stats()["stats"]["num_preemptions_total"] >= 0
