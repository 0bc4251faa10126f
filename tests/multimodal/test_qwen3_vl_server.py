"""Qwen3-VL over /v1/chat/completions (the app over a real AsyncLLM and engine core process, in
process): image_url data URLs, one and two a message, and a text-only message give HF
transformers' greedy tokens on the chat template's prompt."""

from __future__ import annotations

import asyncio

from tessellm.config import EngineArgs
from tests.multimodal.serve_app import MAX_NEW, chat_body, image_part, serve
from tests.multimodal.tiny_llava import data_url
from tests.multimodal.tiny_qwen2_vl import IMAGE, IMAGE_PAD, PROMPT, hf_greedy, image

TWO = f"<|im_start|>user\n{IMAGE} and {IMAGE}Compare them.<|im_end|>\n<|im_start|>assistant\n"
TEXT = "<|im_start|>user\nDescribe a cat.<|im_end|>\n<|im_start|>assistant\n"


async def _requests(c):
    one, two = data_url(image(40)), data_url(image(41, (24, 32)))
    ok = await c.post("/v1/chat/completions", json=chat_body(
        image_part(one), {"type": "text", "text": "What is this?"}, return_token_ids=True))
    pair = await c.post("/v1/chat/completions", json=chat_body(
        image_part(one), {"type": "text", "text": " and "}, image_part(two),
        {"type": "text", "text": "Compare them."}, return_token_ids=True))
    text = await c.post("/v1/chat/completions", json=chat_body(
        {"type": "text", "text": "Describe a cat."}, return_token_ids=True))
    return ok, pair, text


def test_chat_with_image_urls_matches_hf(qwen3_vl_dir):
    args = EngineArgs(model=qwen3_vl_dir, dtype="float32", num_kv_blocks=64, block_size=4,
                      limit_mm_per_prompt={"image": 2})
    responses = asyncio.run(serve(args, _requests))
    for r in responses:
        assert r.status_code == 200, r.text
    assert [r.json()["prompt_token_ids"].count(IMAGE_PAD) for r in responses] == [30, 42, 0]
    want = hf_greedy(qwen3_vl_dir, [PROMPT, TWO, TEXT],
                     [[image(40)], [image(40), image(41, (24, 32))], []], MAX_NEW, kind="qwen3_vl")
    assert [r.json()["choices"][0]["token_ids"] for r in responses] == want
