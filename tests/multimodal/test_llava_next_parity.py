"""LLaVA-NeXT (anyres tiles, unpadding, image_newline) greedy tokens equal HF transformers'
(float32): images of different aspect ratios, so different tile grids and placeholder counts,
in one batch; prompts as token ids; chunked prefill splitting the placeholder spans."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_llava import image
from tests.multimodal.tiny_llava_next import PROMPT, hf_greedy

MAX_NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
# (height, width): a wide image (1x2 tiles, unpadded rows), a tall one (2x1, unpadded
# columns), one near square (2x2)
SIZES = [(30, 70), (80, 30), (50, 52)]


def _tokens(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


def _images(seed: int = 0):
    return [image(seed + i, size=s) for i, s in enumerate(SIZES)]


def _processor_counts(path, images):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(path)
    return [list(proc(text=PROMPT, images=[im])["input_ids"][0]).count(3) for im in images]


@pytest.fixture(scope="module")
def llm(llava_next_dir):
    with LLM(llava_next_dir, dtype="float32", num_kv_blocks=128, block_size=4) as llm:
        yield llm


def test_batch_of_aspect_ratios_matches_hf(llm, llava_next_dir):
    images = _images()
    prompts = [PROMPT, "USER: <image>\nDescribe the image. ASSISTANT:", PROMPT]
    out = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}}
                        for p, im in zip(prompts, images)], GREEDY)
    counts = [o.prompt_token_ids.count(3) for o in out]
    assert counts == _processor_counts(llava_next_dir, images)
    assert len(set(counts)) == 3  # three grids: three placeholder counts
    want = hf_greedy(llava_next_dir, prompts, images, MAX_NEW)
    assert _tokens(out) == want
    assert want[0] != want[2]  # the image decides the output (same text)


def test_token_ids_with_one_placeholder_per_image(llm, llava_next_dir):
    tok = llm.get_tokenizer()
    images = _images(seed=7)
    one = tok.encode(PROMPT)
    assert one.count(3) == 1
    got = llm.generate({"prompt_token_ids": one, "multi_modal_data": {"image": images[1]}}, GREEDY)
    assert _tokens(got) == hf_greedy(llava_next_dir, [PROMPT], [images[1]], MAX_NEW)
    expanded = got[0].prompt_token_ids
    again = llm.generate({"prompt_token_ids": expanded, "multi_modal_data": {"image": images[1]}}, GREEDY)
    assert _tokens(again) == _tokens(got)


def test_two_images_per_prompt_and_chunked_prefill_match_hf(llava_next_dir):
    """Two images of different grids in one prompt, prefilled in chunks of 16 tokens (each
    image's span crosses several steps; the tower runs once per image)."""
    prompt = "USER: <image> and <image>\nCompare them. ASSISTANT:"
    pair = [image(20, size=(30, 70)), image(21, size=(80, 30))]
    prompts = [prompt, PROMPT]
    images = [pair, image(22, size=(50, 52))]
    with LLM(llava_next_dir, dtype="float32", num_kv_blocks=128, block_size=4,
             max_num_batched_tokens=16, enable_chunked_prefill=True,
             limit_mm_per_prompt={"image": 2}) as llm:
        out = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}}
                            for p, im in zip(prompts, images)], GREEDY)
    assert _tokens(out) == hf_greedy(llava_next_dir, prompts, images, MAX_NEW)


def test_concatenated_feature_layers_match_hf(tmp_path):
    """vision_feature_layer [-3, -1]: two layers' states of every tile concatenated into the
    projector."""
    from tests.multimodal.tiny_llava_next import make_tiny_llava_next

    path = make_tiny_llava_next(str(tmp_path / "layers"), seed=3, feature_layer=[-3, -1])
    images = _images(seed=30)[:2]
    with LLM(path, dtype="float32", num_kv_blocks=64, block_size=4) as llm:
        out = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images], GREEDY)
    assert _tokens(out) == hf_greedy(path, [PROMPT, PROMPT], images, MAX_NEW)
