"""LLaVA-NeXT through the chat paths: ``LLM.chat`` with two images of different aspect ratios
and ``/v1/chat/completions`` (engine core process, msgpack carrying each image's original
size), greedy tokens equal to HF's; the encoder budget sized by the biggest image; prefix
caching keyed by the image; what is not supported refused by name."""

from __future__ import annotations

import asyncio

import pytest

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tests.multimodal.serve_app import chat_body as _body, image_part as _img, serve as _serve
from tests.multimodal.tiny_llava import data_url, hf_chat_prompt, image
from tests.multimodal.tiny_llava_next import PINPOINTS, PROMPT, hf_greedy

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
TEXT = {"type": "text", "text": "Compare them."}


def test_chat_with_two_aspect_ratios_matches_hf(llava_next_dir):
    wide, tall = image(50, size=(30, 70)), image(51, size=(80, 30))
    with LLM(llava_next_dir, dtype="float32", num_kv_blocks=128, block_size=4,
             limit_mm_per_prompt={"image": 2}) as llm:
        out = llm.chat([{"role": "user", "content": [
            {"type": "image_pil", "image_pil": wide},
            {"type": "image_url", "image_url": {"url": data_url(tall)}}, TEXT]}], GREEDY)
    prompt = hf_chat_prompt(llava_next_dir, "Compare them.", num_images=2)
    assert [list(out[0].outputs[0].token_ids)] == hf_greedy(llava_next_dir, [prompt], [[wide, tall]], MAX_NEW)


async def _requests(c):
    first = await c.post("/v1/chat/completions", json=_body(
        _img(data_url(image(52, size=(30, 70)))), TEXT, return_token_ids=True))
    again = await c.post("/v1/chat/completions", json=_body(
        _img(data_url(image(52, size=(30, 70)))), TEXT, return_token_ids=True))
    other = await c.post("/v1/chat/completions", json=_body(
        _img(data_url(image(53, size=(80, 30)))), TEXT, return_token_ids=True))
    return first, again, other


def test_chat_completions_over_http_matches_hf(llava_next_dir):
    args = EngineArgs(model=llava_next_dir, dtype="float32", num_kv_blocks=128, block_size=4)
    first, again, other = asyncio.run(_serve(args, _requests))
    prompt = hf_chat_prompt(llava_next_dir, "Compare them.")
    want = hf_greedy(llava_next_dir, [prompt, prompt],
                     [image(52, size=(30, 70)), image(53, size=(80, 30))], MAX_NEW)
    for r in (first, again, other):
        assert r.status_code == 200, r.text
    assert first.json()["choices"][0]["token_ids"] == want[0]
    assert again.json()["choices"][0]["token_ids"] == want[0]  # the prefix-cache hit agrees
    assert other.json()["choices"][0]["token_ids"] == want[1]
    assert first.json()["prompt_token_ids"].count(3) != other.json()["prompt_token_ids"].count(3)


def test_encoder_budget_is_the_biggest_image(llava_next_dir):
    """The budget (and each image's encoder-cache size) comes from the largest pinpoint, as many
    placeholders as the processor gives an image of that size; no image gets more."""
    from transformers import AutoConfig, AutoProcessor

    from tessellm.multimodal.encoder_budget import encoder_budget_args, max_tokens_per_image

    config = AutoConfig.from_pretrained(llava_next_dir)
    proc = AutoProcessor.from_pretrained(llava_next_dir)
    sizes = PINPOINTS + [[30, 70], [80, 30], [50, 52], [200, 90], [11, 13]]
    counts = proc._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    assert max_tokens_per_image(config) == max(counts) == counts[PINPOINTS.index([56, 56])]
    assert encoder_budget_args(config, 16)["max_num_encoder_input_tokens"] == max(counts)


def test_a_step_budget_smaller_than_an_image_still_matches_hf(llava_next_dir):
    """max_num_batched_tokens 8: every image span crosses many steps, the encoder budget is one
    image, two requests with images of different sizes interleave."""
    images = [image(54, size=(56, 56)), image(55, size=(30, 70))]
    with LLM(llava_next_dir, dtype="float32", num_kv_blocks=128, block_size=4,
             max_num_batched_tokens=8, enable_chunked_prefill=True) as llm:
        out = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images], GREEDY)
    assert [list(o.outputs[0].token_ids) for o in out] == hf_greedy(
        llava_next_dir, [PROMPT, PROMPT], images, MAX_NEW)


def test_unsupported_variants_are_refused(tmp_path, llava_next_dir):
    import json
    import shutil


    full = tmp_path / "full"
    shutil.copytree(llava_next_dir, full)
    config = json.loads((full / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    (full / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'full' is not supported"):
        LLM(str(full), dtype="float32", num_kv_blocks=32, block_size=4)
    video = tmp_path / "video"
    shutil.copytree(llava_next_dir, video)
    config.update(architectures=["LlavaNextVideoForConditionalGeneration"], model_type="llava_next_video",
                  vision_feature_select_strategy="default")
    (video / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlavaNextVideoForConditionalGeneration.*not supported"):
        LLM(str(video), dtype="float32", num_kv_blocks=32, block_size=4)


def test_equal_tiles_of_different_image_sizes_are_different_images(llava_next_dir):
    """Two black images, 20x70 and 30x70: the processor gives them the same tiles (black,
    padded with black) but the grid unpads to 2 rows for one and 4 for the other. The original
    size is part of the content hash, so neither the prefix cache nor the encoder cache takes
    one for the other."""
    from PIL import Image

    from tessellm.multimodal.processor import ImageProcessor

    images = [Image.new("RGB", (70, 20)), Image.new("RGB", (70, 30))]
    proc = ImageProcessor(llava_next_dir, 1)
    (_, (a,)), (_, (b,)) = (proc.process(PROMPT, [im]) for im in images)
    assert a.data == b.data and a.length != b.length and a.identifier != b.identifier
    with LLM(llava_next_dir, dtype="float32", num_kv_blocks=128, block_size=4) as llm:
        out = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images], GREEDY)
    assert [list(o.outputs[0].token_ids) for o in out] == hf_greedy(
        llava_next_dir, [PROMPT, PROMPT], images, MAX_NEW)


def test_tensor_parallel_two_ranks(llava_next_dir):
    """The images' original sizes reach every rank's runner through the step codec."""
    images = [image(56, size=(30, 70)), image(57, size=(80, 30))]
    with LLM(llava_next_dir, device="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
             tensor_parallel_size=2) as llm:
        out = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images], GREEDY)
    assert [list(o.outputs[0].token_ids) for o in out] == hf_greedy(
        llava_next_dir, [PROMPT, PROMPT], images, MAX_NEW)
