"""Mistral 3 over /v1/chat/completions (the app over a real AsyncLLM and engine core process,
in process): image_url data URLs, one and two a message, give HF transformers' greedy tokens on
the chat template's prompt; a text-only message still runs; a bad image count is a 400 and the
server goes on serving."""

from __future__ import annotations

import asyncio

from tessellm.config import EngineArgs
from tests.multimodal.serve_app import MAX_NEW, chat_body, image_part, serve
from tests.multimodal.tiny_llava import data_url
from tests.multimodal.tiny_mistral3 import IMG, PROMPT, TEXT, TWO, hf_greedy, image

WHAT = {"type": "text", "text": "What is this?"}


async def _requests(c):
    one, two = data_url(image(40)), data_url(image(41, (24, 32)))
    post = c.post
    ok = await post("/v1/chat/completions", json=chat_body(image_part(one), WHAT, return_token_ids=True))
    pair = await post("/v1/chat/completions", json=chat_body(
        image_part(one), {"type": "text", "text": " and "}, image_part(two),
        {"type": "text", "text": "Compare them."}, return_token_ids=True))
    text = await post("/v1/chat/completions", json=chat_body(
        {"type": "text", "text": "Describe a cat."}, return_token_ids=True))
    three = await post("/v1/chat/completions", json=chat_body(
        image_part(one), image_part(two), image_part(one), WHAT))
    again = await post("/v1/chat/completions", json=chat_body(image_part(one), WHAT, return_token_ids=True))
    return ok, pair, text, three, again


def test_chat_with_image_urls_matches_hf(mistral3_dir):
    args = EngineArgs(model=mistral3_dir, dtype="float32", num_kv_blocks=64, block_size=4,
                      limit_mm_per_prompt={"image": 2})
    ok, pair, text, three, again = asyncio.run(serve(args, _requests))
    for r in (ok, pair, text):
        assert r.status_code == 200, r.text
    assert ok.json()["prompt_token_ids"].count(IMG) == 35
    want = hf_greedy(mistral3_dir, [PROMPT, TWO, TEXT],
                     [[image(40)], [image(40), image(41, (24, 32))], []], MAX_NEW)
    assert [r.json()["choices"][0]["token_ids"] for r in (ok, pair, text)] == want
    assert three.status_code == 400 and "3 images" in three.json()["error"]["message"]
    assert again.status_code == 200 and again.json()["choices"][0]["token_ids"] == want[0]
