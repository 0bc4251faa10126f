"""Qwen3-VL (dense) greedy tokens equal HF transformers' (float32): the tower's interpolated
position table and DeepStack features (added after the first two text layers), interleaved
M-RoPE and the Qwen3 text model's q/k norms, over images of different sizes, two in one
prompt, and a text-only prompt in one batch; chunked prefill through an image (DeepStack rows
split across steps); ``LLM.chat``."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.multimodal.image_requests import generate
from tests.multimodal.tiny_qwen2_vl import IMAGE, IMAGE_PAD, PROMPT, hf_greedy, image

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
TWO = f"<|im_start|>user\n{IMAGE} and {IMAGE}Compare them.<|im_end|>\n<|im_start|>assistant\n"
TEXT = "<|im_start|>user\nDescribe a cat.<|im_end|>\n<|im_start|>assistant\n"
KIND = "qwen3_vl"


def _generate(llm, prompts, images, params=GREEDY):
    return generate(llm, prompts, images, params)


@pytest.fixture(scope="module")
def llm(qwen3_vl_dir):
    with LLM(qwen3_vl_dir, dtype="float32", num_kv_blocks=128, block_size=4,
             limit_mm_per_prompt={"image": 2}) as llm:
        yield llm


def test_batch_of_sizes_two_images_and_text_matches_hf(llm, qwen3_vl_dir):
    prompts = [PROMPT, PROMPT, TWO, TEXT]
    # merged grids 5x6, 4x3, then 3x4 and 5x6
    images = [[image(1)], [image(2, (32, 24))], [image(3, (24, 32)), image(4)], []]
    got, out = _generate(llm, prompts, images)
    assert [o.prompt_token_ids.count(IMAGE_PAD) for o in out] == [30, 12, 42, 0]
    want = hf_greedy(qwen3_vl_dir, prompts, images, MAX_NEW, kind=KIND)
    assert got == want
    assert len({tuple(w) for w in want[:3]}) == 3  # the images decide the outputs


def test_chunked_prefill_splits_image_and_deepstack_rows(qwen3_vl_dir):
    """8-token chunks: each image's 30 rows (and their DeepStack features) cross four steps."""
    prompts, images = [TWO, PROMPT], [[image(5, (24, 32)), image(6)], [image(7)]]
    with LLM(qwen3_vl_dir, dtype="float32", num_kv_blocks=128, block_size=4, max_num_batched_tokens=8,
             enable_chunked_prefill=True, limit_mm_per_prompt={"image": 2}) as llm:
        got, _ = _generate(llm, prompts, images)
    assert got == hf_greedy(qwen3_vl_dir, prompts, images, MAX_NEW, kind=KIND)


def test_chat_with_an_image_matches_hf(llm, qwen3_vl_dir):
    message = {"role": "user", "content": [{"type": "image_pil", "image_pil": image(8)},
                                           {"type": "text", "text": "What is this?"}]}
    out = llm.chat([message], GREEDY, use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == hf_greedy(qwen3_vl_dir, [PROMPT], [[image(8)]], MAX_NEW, kind=KIND)[0]


@pytest.mark.slow  # two worker processes: ~20 s on 2 shared cores
def test_tensor_parallel_two_ranks_with_chunked_prefill(qwen3_vl_dir):
    """DeepStack features go into the residual stream, whole on both ranks (the MLP outputs
    are the partial sums); 16-token chunks through the images."""
    prompts, images = [TWO, PROMPT], [[image(9, (24, 32)), image(10)], [image(11)]]
    with LLM(qwen3_vl_dir, device="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
             tensor_parallel_size=2, max_num_batched_tokens=16, limit_mm_per_prompt={"image": 2}) as llm:
        got, _ = _generate(llm, prompts, images)
    assert got == hf_greedy(qwen3_vl_dir, prompts, images, MAX_NEW, kind=KIND)
