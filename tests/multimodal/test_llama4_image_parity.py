"""Llama 4 with images (``Llama4ForConditionalGeneration``) against HF transformers in float32
on a tiny random model (16 px tiles, 4 tokens a tile, up to 4 tiles and a global view an
image; dense and MoE, rope and NoPE layers): greedy tokens for one and two images per prompt
(one tile, and a grid of tiles whose span holds separator tokens) and a text-only prompt in one
batch; token-id prompts, placeholder or expanded; chunked prefill that splits an image's span
and a prefix-cache hit over it, the vision model run once per image; and the refusals, after
which the engine goes on serving."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_llama4 import (IMAGE, IMAGE_START, PATCH, PER_TILE, PROMPT, TEXT,
                                          TILE_X, TILE_Y, TWO, hf_greedy, image)

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
BS = 4
SMALL, WIDE = (12, 14), (14, 40)  # one tile; a row of tiles (and the global view)


def _request(prompt, images):
    return {"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt


def _generate(llm, requests, params=GREEDY):
    out = llm.generate(requests, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in out], out


def _llm(path, **kw):
    return LLM(path, dtype="float32", num_kv_blocks=160, block_size=BS,
               limit_mm_per_prompt={"image": 2}, **kw)


@pytest.fixture(scope="module")
def llm(llama4_dir):
    with _llm(llama4_dir) as llm:
        yield llm


@pytest.fixture(scope="module")
def want(llama4_dir):
    """HF's tokens for PROMPT with a small image and with a tiled one, TWO with both."""
    return hf_greedy(llama4_dir, [PROMPT, PROMPT, TWO],
                     [[image(1, SMALL)], [image(2)], [image(3, WIDE), image(4)]], MAX_NEW)


def test_one_and_two_images_and_text_in_a_batch_match_hf(llm, llama4_dir, want):
    images = [[image(1, SMALL)], [image(2)], [image(3, WIDE), image(4)], []]
    got, out = _generate(llm, [_request(p, im) for p, im in
                               zip([PROMPT, PROMPT, TWO, TEXT], images)])
    ids = [o.prompt_token_ids for o in out]
    assert [i.count(IMAGE_START) for i in ids] == [1, 1, 2, 0]
    assert ids[0].count(PATCH) == PER_TILE and TILE_Y not in ids[0]  # one tile
    assert TILE_Y in ids[1] and ids[1].count(PATCH) > 2 * PER_TILE  # a grid and the global view
    assert TILE_X in ids[2]  # a separator inside an image's span
    assert got == want + hf_greedy(llama4_dir, [TEXT], [[]], MAX_NEW)
    assert want[0] != want[1]  # the image decides the output (the same text)


def test_token_id_prompts_placeholder_or_expanded(llm, llama4_dir, want):
    """One ``<|image|>`` per image in the ids is expanded as the processor expands the text;
    the processor's expanded ids are taken as they are."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(llama4_dir)(TWO)["input_ids"]
    assert ids.count(IMAGE) == 2 and PATCH not in ids
    images = [image(3, WIDE), image(4)]
    got, out = _generate(llm, [{"prompt_token_ids": ids, "multi_modal_data": {"image": images}}])
    expanded = out[0].prompt_token_ids
    again, _ = _generate(llm, [{"prompt_token_ids": expanded, "multi_modal_data": {"image": images}}])
    assert got == again == [want[2]]


def test_chunked_prefill_splits_the_span_and_the_prefix_cache_holds_it(llama4_dir, want):
    """4 tokens a step: the tiled image's span (separators included) is computed over several
    steps from one vision-model run; the same image again reuses the cached blocks over it."""
    request = _request(PROMPT, [image(2)])
    with _llm(llama4_dir, max_num_batched_tokens=4) as llm:
        cache = llm.engine.core.runner.encoder_cache
        first, a = _generate(llm, [request])
        assert cache.num_encoded == 1
        second, b = _generate(llm, [_request(PROMPT, [image(2)])])
        last_patch = len(a[0].prompt_token_ids) - 1 - a[0].prompt_token_ids[::-1].index(PATCH)
        assert b[0].num_cached_tokens > last_patch and cache.num_encoded == 1
        assert first == second == [want[1]]
        assert not cache.features


def test_bad_image_inputs_are_refused_and_the_engine_goes_on(llm, want):
    one = [image(1, SMALL)]
    cases = [
        (_request(PROMPT, one + one), r"1 <\|image\|> for 2 image"),
        (_request(PROMPT, ["not an image"]), r"give PIL.Image.Image"),
        (_request(TWO + TWO, [image(1, SMALL)] * 3), "over the limit of 2"),
        ({"prompt_token_ids": [1, PATCH, PATCH, 5]}, "image placeholder tokens"),
    ]
    for request, match in cases:
        with pytest.raises(ValueError, match=match):
            llm.generate(request, GREEDY, use_tqdm=False)
    _, out = _generate(llm, [_request(PROMPT, [image(2)])])
    broken = list(out[0].prompt_token_ids)
    broken[broken.index(TILE_X) if TILE_X in broken else broken.index(TILE_Y)] = PATCH
    with pytest.raises(ValueError, match="not the processor's layout"):
        llm.generate({"prompt_token_ids": broken, "multi_modal_data": {"image": [image(2)]}},
                     GREEDY, use_tqdm=False)
    got, _ = _generate(llm, [_request(PROMPT, [image(1, SMALL)])])
    assert got == [want[0]]


@pytest.mark.slow  # two worker processes: ~30 s on 2 shared cores
def test_tensor_parallel_two_ranks_with_chunked_prefill(llama4_dir, want):
    """Each rank's runner gets the images' tiles and tile grids through the step codec (the
    tower replicated, the language model's heads and experts split; 8-token chunks)."""
    with _llm(llama4_dir, device="cpu", tensor_parallel_size=2, max_num_batched_tokens=8) as llm:
        got, _ = _generate(llm, [_request(PROMPT, [image(2)]),
                                 _request(TWO, [image(3, WIDE), image(4)])])
    assert got == want[1:]
