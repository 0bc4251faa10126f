"""Images and the KV cache: prefix-cache blocks over image placeholders are keyed by the
image's content, chunked prefill may split an image's span, preemption recomputes features.
Every output is checked against HF transformers' greedy tokens (float32)."""

from __future__ import annotations

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_llava import FEATURES, PROMPT, hf_greedy, image

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
BS = 4


def _run(llm, prompt, img):
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), out


def test_same_text_other_image_shares_only_the_blocks_before_it(llava_dir):
    with LLM(llava_dir, dtype="float32", num_kv_blocks=64, block_size=BS) as llm:
        first, a = _run(llm, PROMPT, image(10))
        second, b = _run(llm, PROMPT, image(11))
        offset = a.prompt_token_ids.index(3)
        assert a.prompt_token_ids == b.prompt_token_ids  # the same tokens: only pixels differ
        assert b.num_cached_tokens == offset // BS * BS  # no block over the image is shared
        want = hf_greedy(llava_dir, [PROMPT, PROMPT], [image(10), image(11)], MAX_NEW)
        assert [first, second] == want and want[0] != want[1]


def test_same_image_again_hits_the_prefix_cache(llava_dir):
    with LLM(llava_dir, dtype="float32", num_kv_blocks=64, block_size=BS) as llm:
        cache = llm.engine.core.runner.encoder_cache
        first, a = _run(llm, PROMPT, image(12))
        assert cache.num_encoded == 1
        second, b = _run(llm, PROMPT, image(12))  # an equal image (a new PIL object)
        end = a.prompt_token_ids.index(3) + FEATURES
        assert b.num_cached_tokens >= end  # the image's blocks came from the cache ...
        assert cache.num_encoded == 1  # ... so the vision tower did not run again
        assert first == second == hf_greedy(llava_dir, [PROMPT], [image(12)], MAX_NEW)[0]
        assert not cache.features  # nothing held after the requests ended


def test_chunked_prefill_splits_the_image_span(llava_dir):
    """8 tokens a step: the 16 placeholders take three steps; the tower runs once per image."""
    prompts = [PROMPT, "USER: <image>\nDescribe the image. ASSISTANT:"]
    images = [image(13), image(14)]
    with LLM(llava_dir, dtype="float32", num_kv_blocks=64, block_size=BS, max_num_batched_tokens=8,
             enable_prefix_caching=False) as llm:
        outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}}
                             for p, im in zip(prompts, images)], GREEDY, use_tqdm=False)
        cache = llm.engine.core.runner.encoder_cache
        assert cache.num_encoded == 2 and not cache.features
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_greedy(llava_dir, prompts, images, MAX_NEW)


def test_preemption_recomputes_the_image_features(llava_dir):
    """A cache too small for all four: requests are preempted and resume (from the prefix
    cache where their blocks survived, possibly inside an image's span), recomputing features."""
    prompts = [PROMPT, "USER: <image>\nDescribe the image. ASSISTANT:"] * 2
    images = [image(20 + i) for i in range(4)]
    with LLM(llava_dir, dtype="float32", num_kv_blocks=20, block_size=BS, max_num_batched_tokens=16,
             max_num_seqs=4) as llm:
        outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}}
                             for p, im in zip(prompts, images)],
                            SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16, ignore_eos=True), use_tqdm=False)
        core = llm.engine.core
        assert core.scheduler.num_preemptions_total > 0
        assert core.runner.encoder_cache.num_encoded > 4  # recomputed after preemption
        assert not core.runner.encoder_cache.features
        assert core.kv.num_free_blocks == core.kv.num_blocks
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_greedy(llava_dir, prompts, images, 16)


def test_equal_images_in_one_batch_are_encoded_once(llava_dir):
    """Two prompts with the same image in one step (prefix caching off, so neither hits the
    other's blocks), and n=2 samples of a third: the tower runs once per distinct image."""
    prompts = [PROMPT, "USER: <image>\nDescribe the image. ASSISTANT:"]
    with LLM(llava_dir, dtype="float32", num_kv_blocks=64, block_size=BS,
             enable_prefix_caching=False) as llm:
        outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": image(60)}} for p in prompts],
                            GREEDY, use_tqdm=False)
        cache = llm.engine.core.runner.encoder_cache
        assert cache.num_encoded == 1 and not cache.features
        two = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image(61)}},
                           SamplingParams(n=2, temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW,
                                          ignore_eos=True), use_tqdm=False)[0]
    want = hf_greedy(llava_dir, prompts + [PROMPT], [image(60), image(60), image(61)], MAX_NEW)
    assert [list(o.outputs[0].token_ids) for o in outs] == want[:2]
    assert [list(c.token_ids) for c in two.outputs] == [want[2], want[2]]


def test_abort_inside_an_image_span_frees_its_features(llava_dir):
    """A request aborted after a chunk that ends inside its image: the runner forgets the
    features (and the blocks are freed); the next request is unaffected."""
    with LLM(llava_dir, dtype="float32", num_kv_blocks=64, block_size=BS, max_num_batched_tokens=8) as llm:
        engine = llm.engine
        engine.add_request("a", {"prompt": PROMPT, "multi_modal_data": {"image": image(80)}}, GREEDY)
        cache = engine.core.runner.encoder_cache
        while not cache.features:  # the chunk that reaches the image (8 tokens a step)
            engine.step()
        engine.abort_request("a")
        assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks
        got, _ = _run(llm, PROMPT, image(81))  # the abort reaches the runner with this step
        assert not cache.features and "a" not in engine.core.runner.requests
    assert got == hf_greedy(llava_dir, [PROMPT], [image(81)], MAX_NEW)[0]
