"""Qwen2-VL over /v1/chat/completions (the app over a real AsyncLLM and engine core process, in
process): an image_url data URL gives HF transformers' greedy tokens on the chat template's
prompt (the same as offline); an undecodable video (or no decoder installed) and video pads
without a video are 400s naming it, and the server goes on serving."""

from __future__ import annotations

import asyncio

from tessellm.config import EngineArgs
from tests.multimodal.serve_app import MAX_NEW, chat_body, image_part, serve
from tests.multimodal.tiny_llava import data_url
from tests.multimodal.tiny_qwen2_vl import IMAGE_PAD, PROMPT, hf_greedy, image

TEXT = {"type": "text", "text": "What is this?"}


async def _requests(c):
    url = data_url(image(40))
    ok = await c.post("/v1/chat/completions", json=chat_body(image_part(url), TEXT, return_token_ids=True))
    video = await c.post("/v1/chat/completions", json=chat_body(
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, TEXT))
    video_token = await c.post("/v1/chat/completions", json=chat_body(
        image_part(url), {"type": "text", "text": "<|video_pad|> and this?"}))
    text_video = await c.post("/v1/chat/completions", json=chat_body(
        {"type": "text", "text": "<|video_pad|> and this?"}))
    again = await c.post("/v1/chat/completions", json=chat_body(image_part(url), TEXT, return_token_ids=True))
    return ok, video, (video_token, text_video), again


def test_chat_with_an_image_data_url_matches_hf(qwen2_vl_dir):
    args = EngineArgs(model=qwen2_vl_dir, dtype="float32", num_kv_blocks=64, block_size=4)
    ok, video, video_token, again = asyncio.run(serve(args, _requests))
    assert ok.status_code == 200, ok.text
    assert ok.json()["prompt_token_ids"].count(IMAGE_PAD) == 30
    want = hf_greedy(qwen2_vl_dir, [PROMPT], [[image(40)]], MAX_NEW)[0]
    assert ok.json()["choices"][0]["token_ids"] == want
    message = video.json()["error"]["message"]
    assert video.status_code == 400 and ("pip install av" in message or "can read" in message)
    for r in video_token:  # <|video_pad|> with an image, and in a text-only prompt
        assert r.status_code == 400, r.text
        assert "video placeholder tokens (<|video_pad|>, id 6) but no video" in r.json()["error"]["message"]
    assert again.status_code == 200 and again.json()["choices"][0]["token_ids"] == want
