"""Gemma 3 with images over /v1/chat/completions (the app over a real AsyncLLM and engine core
process, in process) and ``LLM.chat``: an image_url data URL gives HF transformers' greedy
tokens on the chat template's prompt; too many images and video are each a 400 naming the
problem, and the server goes on serving. Also: a checkpoint in transformers 5's in-memory layout
(``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``) and one in the hub's
(``vision_tower.vision_model.*``) load to the same tokens."""

from __future__ import annotations

import asyncio

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tests.multimodal.serve_app import MAX_NEW, chat_body, image_part, serve
from tests.multimodal.tiny_gemma3 import SOFT, TOKENS, image
from tests.multimodal.tiny_llava import data_url, hf_chat_prompt, hf_greedy

ARCH = "Gemma3ForConditionalGeneration"
TEXT = {"type": "text", "text": "What is this?"}


async def _requests(c):
    url = data_url(image(40))
    ok = await c.post("/v1/chat/completions", json=chat_body(image_part(url), TEXT, return_token_ids=True))
    two = await c.post("/v1/chat/completions", json=chat_body(image_part(url), image_part(url), TEXT))
    video = await c.post("/v1/chat/completions", json=chat_body(
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, TEXT))
    again = await c.post("/v1/chat/completions", json=chat_body(image_part(url), TEXT, return_token_ids=True))
    return ok, two, video, again


def test_chat_with_an_image_data_url_matches_hf(gemma3_dir):
    args = EngineArgs(model=gemma3_dir, dtype="float32", num_kv_blocks=64, block_size=4)
    ok, two, video, again = asyncio.run(serve(args, _requests))
    assert ok.status_code == 200, ok.text
    assert ok.json()["prompt_token_ids"].count(SOFT) == TOKENS
    want = hf_greedy(gemma3_dir, [hf_chat_prompt(gemma3_dir, "What is this?")], [[image(40)]],
                     MAX_NEW, architecture=ARCH)[0]
    assert ok.json()["choices"][0]["token_ids"] == want
    assert two.status_code == 400 and "2 images" in two.json()["error"]["message"]
    assert video.status_code == 400 and "video_url" in video.json()["error"]["message"]
    assert again.status_code == 200 and again.json()["choices"][0]["token_ids"] == want


def _resave(src: str, dst: str, rename) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(f"{dst}/model.safetensors")
    save_file({rename(n): t.contiguous() for n, t in tensors.items()}, f"{dst}/model.safetensors",
              metadata={"format": "pt"})


def _in_memory(name: str) -> str:
    """transformers 5's in-memory names (``model.*``, ``lm_head.*``)."""
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    return "model." + name


def _hub(name: str) -> str:
    """The hub's Gemma 3 names: the tower under ``vision_tower.vision_model.*``."""
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


def test_offline_chat_and_checkpoint_layouts(gemma3_dir, tmp_path):
    """``LLM.chat`` with an image_url part gives HF's tokens, from the checkpoint as
    transformers 5.25 saves it, with transformers 5's in-memory names, and with the hub's."""
    from transformers import Gemma3ForConditionalGeneration

    names = set(Gemma3ForConditionalGeneration.from_pretrained(gemma3_dir).state_dict())
    memory, hub = str(tmp_path / "memory"), str(tmp_path / "hub")
    _resave(gemma3_dir, memory, _in_memory)
    _resave(gemma3_dir, hub, _hub)
    from safetensors import safe_open

    with safe_open(f"{memory}/model.safetensors", "pt") as f:
        assert set(f.keys()) <= names  # the names HF's own model has
    message = [{"role": "user", "content": [image_part(data_url(image(41))), TEXT]}]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
    want = hf_greedy(gemma3_dir, [hf_chat_prompt(gemma3_dir, "What is this?")], [[image(41)]],
                     MAX_NEW, architecture=ARCH)[0]
    for p in (gemma3_dir, memory, hub):
        with LLM(p, dtype="float32", num_kv_blocks=64, block_size=4) as llm:
            out = llm.chat(message, params, use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == want, p
