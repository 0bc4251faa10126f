"""LLaVA-1.5 greedy tokens equal HF transformers' (float32), offline ``LLM.generate`` with
``multi_modal_data``: one image; a batch of prompts with different images; prompts given as
token ids with one placeholder per image (expanded by the engine)."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_llava import FEATURES, PROMPT, hf_greedy, image

MAX_NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llava_dir):
    with LLM(llava_dir, dtype="float32", num_kv_blocks=64, block_size=4) as llm:
        yield llm


def _tokens(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


def test_one_image_matches_hf(llm, llava_dir):
    out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image(0)}}, GREEDY)
    assert _tokens(out) == hf_greedy(llava_dir, [PROMPT], [image(0)], MAX_NEW)
    assert out[0].prompt_token_ids.count(3) == FEATURES  # <image> expanded to the patch tokens


def test_batch_of_different_images_matches_hf(llm, llava_dir):
    prompts = [PROMPT, "USER: <image>\nDescribe the image. ASSISTANT:", PROMPT]
    images = [image(1), image(2), image(3, size=(60, 30))]
    out = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}}
                        for p, im in zip(prompts, images)], GREEDY)
    want = hf_greedy(llava_dir, prompts, images, MAX_NEW)
    assert _tokens(out) == want
    assert want[0] != want[2]  # the image decides the output (same text)


def test_token_ids_with_one_placeholder_per_image(llm, llava_dir):
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPT)
    assert ids.count(3) == 1
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": image(4)}}, GREEDY)
    assert _tokens(out) == hf_greedy(llava_dir, [PROMPT], [image(4)], MAX_NEW)
    expanded = out[0].prompt_token_ids
    assert len(expanded) == len(ids) + FEATURES - 1
    again = llm.generate({"prompt_token_ids": expanded, "multi_modal_data": {"image": image(4)}}, GREEDY)
    assert _tokens(again) == _tokens(out)


def test_full_strategy_and_concatenated_layers_match_hf(tmp_path):
    """vision_feature_select_strategy "full" (the class token kept: 17 placeholders) and
    vision_feature_layer [-3, -1] (two layers' states concatenated into the projector)."""
    from tests.multimodal.tiny_llava import make_tiny_llava

    path = make_tiny_llava(str(tmp_path / "full"), seed=3, strategy="full", feature_layer=[-3, -1])
    with LLM(path, dtype="float32", num_kv_blocks=32, block_size=4) as llm:
        out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image(5)}}, GREEDY)
    assert out[0].prompt_token_ids.count(3) == FEATURES + 1
    assert _tokens(out) == hf_greedy(path, [PROMPT], [image(5)], MAX_NEW)
