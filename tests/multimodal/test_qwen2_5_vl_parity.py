"""Qwen2.5-VL greedy tokens equal HF transformers' (float32): the tower's window attention
(windows of 2x2 merge blocks, partial at the right and bottom edges; block 1 attends over the
whole image), RMSNorm and SwiGLU blocks, over images of different sizes, two in one prompt, and
a text-only prompt, in one batch."""

from __future__ import annotations

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_qwen2_vl import IMAGE, IMAGE_PAD, PROMPT, hf_greedy, image

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
TWO = f"<|im_start|>user\n{IMAGE} and {IMAGE}Compare them.<|im_end|>\n<|im_start|>assistant\n"
TEXT = "<|im_start|>user\nDescribe a cat.<|im_end|>\n<|im_start|>assistant\n"


def test_window_attention_tower_matches_hf(qwen2_5_vl_dir):
    prompts = [PROMPT, PROMPT, TWO, TEXT]
    # merged grids 5x6 (windows 2x2, 2x1, 1x2, 1x1), 4x3, 3x4
    images = [[image(1)], [image(2, (32, 24))], [image(3, (24, 32)), image(4)], []]
    with LLM(qwen2_5_vl_dir, dtype="float32", num_kv_blocks=128, block_size=4,
             limit_mm_per_prompt={"image": 2}) as llm:
        out = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}} if im else p
                            for p, im in zip(prompts, images)], GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids.count(IMAGE_PAD) for o in out] == [30, 12, 42, 0]
    want = hf_greedy(qwen2_5_vl_dir, prompts, images, MAX_NEW, kind="qwen2_5_vl")
    assert [list(o.outputs[0].token_ids) for o in out] == want
    assert len({tuple(w) for w in want[:3]}) == 3  # the images decide the outputs


def test_chat_and_server_image_urls_match_hf(qwen2_5_vl_dir):
    """``LLM.chat`` with two images, and /v1/chat/completions with one and two ``image_url``
    data URLs and text only, give HF's tokens on the chat template's prompts."""
    import asyncio

    from tessellm.config import EngineArgs
    from tests.multimodal.serve_app import chat_body, image_part, serve
    from tests.multimodal.tiny_llava import data_url

    images = [image(5), image(6, (24, 32))]
    parts = [{"type": "image_pil", "image_pil": images[0]}, {"type": "text", "text": " and "},
             {"type": "image_pil", "image_pil": images[1]}, {"type": "text", "text": "Compare them."}]
    with LLM(qwen2_5_vl_dir, dtype="float32", num_kv_blocks=128, block_size=4,
             limit_mm_per_prompt={"image": 2}) as llm:
        chat = llm.chat([{"role": "user", "content": parts}], GREEDY, use_tqdm=False)

    urls = [image_part(data_url(im)) for im in images]
    what = {"type": "text", "text": "What is this?"}

    async def requests(c):
        bodies = [chat_body(urls[0], what, return_token_ids=True),
                  chat_body(urls[0], parts[1], urls[1], parts[3], return_token_ids=True),
                  chat_body({"type": "text", "text": "Describe a cat."}, return_token_ids=True)]
        return [await c.post("/v1/chat/completions", json=b) for b in bodies]

    args = EngineArgs(model=qwen2_5_vl_dir, dtype="float32", num_kv_blocks=64, block_size=4,
                      limit_mm_per_prompt={"image": 2})
    responses = asyncio.run(serve(args, requests))
    want = hf_greedy(qwen2_5_vl_dir, [PROMPT, TWO, TEXT], [images[:1], images, []], MAX_NEW,
                     kind="qwen2_5_vl")
    assert list(chat[0].outputs[0].token_ids) == want[1]
    for r in responses:
        assert r.status_code == 200, r.text
    assert [r.json()["choices"][0]["token_ids"] for r in responses] == want
