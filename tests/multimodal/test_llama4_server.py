"""Llama 4 with images over /v1/chat/completions (the app over a real AsyncLLM and engine core
process, in process) and ``LLM.chat``: an image_url data URL gives HF transformers' greedy
tokens on the chat template's prompt (HF's Llama 4 template, ``<|image|>`` per image part);
an image that does not decode and too many images are each a 400 naming the problem, and the
server goes on serving. Also: a checkpoint saved without a processor, and (without torchvision)
one saved with transformers' Llama4ImageProcessor, serve text and refuse images with one clear
error."""

from __future__ import annotations

import asyncio

import pytest

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tests.multimodal.serve_app import MAX_NEW, chat_body, image_part, serve
from tests.multimodal.tiny_llama4 import IMAGE_START, PROMPT, has_torchvision, hf_greedy, image
from tests.multimodal.tiny_llama4 import TEXT as TEXT_PROMPT
from tests.multimodal.tiny_llava import data_url, hf_chat_prompt

TEXT = {"type": "text", "text": "What is this?"}


async def _requests(c):
    url = data_url(image(40))
    ok = await c.post("/v1/chat/completions", json=chat_body(image_part(url), TEXT, return_token_ids=True))
    broken = await c.post("/v1/chat/completions", json=chat_body(
        image_part("data:image/png;base64,AAAA"), TEXT))
    three = await c.post("/v1/chat/completions", json=chat_body(*[image_part(url)] * 3, TEXT))
    again = await c.post("/v1/chat/completions", json=chat_body(image_part(url), TEXT, return_token_ids=True))
    return ok, broken, three, again


def test_chat_with_an_image_data_url_matches_hf(llama4_dir):
    args = EngineArgs(model=llama4_dir, dtype="float32", num_kv_blocks=64, block_size=4,
                      limit_mm_per_prompt={"image": 2})
    ok, broken, three, again = asyncio.run(serve(args, _requests))
    assert ok.status_code == 200, ok.text
    assert ok.json()["prompt_token_ids"].count(IMAGE_START) == 1
    want = hf_greedy(llama4_dir, [hf_chat_prompt(llama4_dir, "What is this?")], [[image(40)]],
                     MAX_NEW)[0]
    assert ok.json()["choices"][0]["token_ids"] == want
    assert broken.status_code == 400 and "image" in broken.json()["error"]["message"].lower()
    assert three.status_code == 400 and "3 images" in three.json()["error"]["message"]
    assert again.status_code == 200 and again.json()["choices"][0]["token_ids"] == want


def test_offline_chat_with_two_images_matches_hf(llama4_dir):
    message = [{"role": "user", "content": [image_part(data_url(image(41))), TEXT,
                                            image_part(data_url(image(42, (14, 40))))]}]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
    from transformers import AutoProcessor

    content = [{"type": "image"}, {"type": "text", "text": "What is this?"}, {"type": "image"}]
    prompt = AutoProcessor.from_pretrained(llama4_dir).apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    want = hf_greedy(llama4_dir, [prompt], [[image(41), image(42, (14, 40))]], MAX_NEW)[0]
    with LLM(llama4_dir, dtype="float32", num_kv_blocks=64, block_size=4,
             limit_mm_per_prompt={"image": 2}) as llm:
        out = llm.chat(message, params, use_tqdm=False)[0]
    assert out.prompt_token_ids.count(IMAGE_START) == 2
    assert list(out.outputs[0].token_ids) == want


def test_checkpoint_without_a_processor_serves_text_and_refuses_images(llama4_dir, tmp_path):
    import shutil

    bare = str(tmp_path / "bare")
    shutil.copytree(llama4_dir, bare, ignore=shutil.ignore_patterns("*processor*", "chat_template*"))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(llama4_dir)("Describe a cat.")["input_ids"]
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with LLM(bare, dtype="float32", num_kv_blocks=64, block_size=4) as llm:
        with pytest.raises(ValueError, match="no usable image processor"):
            llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": image(1)}}, greedy)
        out = llm.generate([{"prompt_token_ids": ids}], greedy, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.skipif(has_torchvision(), reason="torchvision is installed: the real processor loads")
def test_without_torchvision_images_get_one_error_and_text_is_served(llama4_dir, tmp_path):
    """A checkpoint saved with transformers' Llama4ImageProcessor, on a machine without
    torchvision: an image request is refused naming torchvision; text prompts still run."""
    import json
    import shutil

    real = str(tmp_path / "real")
    shutil.copytree(llama4_dir, real)
    with open(f"{real}/processor_config.json") as f:
        config = json.load(f)
    config["image_processor"]["image_processor_type"] = "Llama4ImageProcessor"
    with open(f"{real}/processor_config.json", "w") as f:
        json.dump(config, f)
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with LLM(real, dtype="float32", num_kv_blocks=64, block_size=4) as llm:
        with pytest.raises(ValueError, match="need torchvision"):
            llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image(1)}}, greedy)
        out = llm.generate([TEXT_PROMPT], greedy, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
