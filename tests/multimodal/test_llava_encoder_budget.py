"""The encoder budget on the tiny LLaVA (16 placeholder tokens an image): many image requests
with a small step budget, chunks ending inside images, greedy tokens equal to HF
transformers and to an unchunked run; the vision tower's work per step bounded."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_llava import FEATURES, hf_greedy, image

IMAGE_ID = 3  # the tiny LLaVA's <image> token

MAX_NEW = 5
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
PROMPTS = ["USER: <image>\nWhat is this? ASSISTANT:",
           "USER: <image>\n<image>\nCompare them. ASSISTANT:",
           "USER: Describe the image. <image>\nASSISTANT:",
           "USER: <image>\n<image>\nWhat is this? ASSISTANT:",
           "USER: <image>\nDescribe the image. ASSISTANT:",
           "USER: What is this? <image>\n ASSISTANT:"]


def _images():
    seed = iter(range(300, 400))
    return [[image(next(seed)) for _ in range(p.count("<image>"))] for p in PROMPTS]


def _generate(path, images, max_batched, log=None, **engine_kwargs):
    with LLM(path, dtype="float32", num_kv_blocks=128, block_size=4, max_num_seqs=6,
             max_num_batched_tokens=max_batched, limit_mm_per_prompt={"image": 2},
             enable_prefix_caching=False, **engine_kwargs) as llm:
        core = llm.engine.core
        if log is not None:  # record each step's decision and the tower's runs before it
            schedule, cache = core.scheduler.schedule, core.runner.encoder_cache

            def recorded():
                log.append(("encoded", cache.num_encoded, len(set(cache.identifiers.values()))))
                out = schedule()
                log.append(("step", dict(out.num_scheduled_tokens), dict(out.encoder_inputs)))
                return out

            core.scheduler.schedule = recorded
        outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}}
                             for p, im in zip(PROMPTS, images)], GREEDY, use_tqdm=False)
        config = core.scheduler.config
        budget = (config.max_num_encoder_input_tokens, config.encoder_cache_size)
        assert not core.runner.encoder_cache.features
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    starts = {o.request_id: [i for i, t in enumerate(o.prompt_token_ids)  # image offsets
                             if t == IMAGE_ID and o.prompt_token_ids[i - 1] != IMAGE_ID]
              for o in outs}
    return tokens, budget, starts


def _deferred(steps, starts) -> list[str]:
    """Requests whose chunk stopped at one of their images' first placeholder although a
    request after them in the same step still got tokens (so the token budget was not what
    stopped them)."""
    computed, cut = dict.fromkeys(starts, 0), []
    for _, scheduled, _ in steps:
        order = list(scheduled)
        for k, rid in enumerate(order):
            computed[rid] += scheduled[rid]
            if computed[rid] in starts[rid] and k < len(order) - 1:
                cut.append(rid)
    return cut


def test_many_images_with_a_small_step_budget(llava_dir):
    """8 tokens a step: the encoder budget and cache default to one image (max(8, 16)), so
    each step reaches at most one new image and a chunk stops at an image while another is
    still cached; the tokens equal HF's and an unchunked run's."""
    images = _images()
    log = []
    tokens, budget, starts = _generate(llava_dir, images, 8, log)
    assert budget == (FEATURES, FEATURES)
    steps = [e for e in log if e[0] == "step"]
    runs = [e[1] for e in log if e[0] == "encoded"]
    assert runs[-1] == sum(map(len, images))  # every image encoded exactly once
    assert all(b - a <= 1 for a, b in zip(runs, runs[1:]))  # the tower: one image a step at most
    assert all(e[2] <= 1 for e in log if e[0] == "encoded")  # the cache: one image held at most
    assert all(sum(map(len, e[2].values())) <= 1 for e in steps)
    assert _deferred(steps, starts)  # an image waited for the cache to free
    unchunked, big, _ = _generate(llava_dir, images, 512)
    assert big == (512, 512)
    assert tokens == unchunked == hf_greedy(llava_dir, PROMPTS, images, MAX_NEW)


def test_a_step_budget_of_two_and_a_half_images(llava_dir):
    """40 tokens a step (encoder budget and cache 40): no step reaches more than two images."""
    images = _images()
    log = []
    tokens, budget, starts = _generate(llava_dir, images, 40, log)
    assert budget == (40, 40)
    assert all(sum(map(len, e[2].values())) * FEATURES <= 40 for e in log if e[0] == "step")
    assert all(e[2] * FEATURES <= 40 for e in log if e[0] == "encoded")
    assert tokens == hf_greedy(llava_dir, PROMPTS, images, MAX_NEW)


def _chunk_ends_inside_images(steps, starts) -> list[tuple[str, int]]:
    """(request, position) for each chunk that ended strictly inside one of its images."""
    computed, inside = dict.fromkeys(starts, 0), []
    for _, scheduled, _ in steps:
        for rid, num in scheduled.items():
            computed[rid] += num
            if any(s < computed[rid] < s + FEATURES for s in starts[rid]):
                inside.append((rid, computed[rid]))
    return inside


def test_disable_chunked_mm_input_keeps_each_image_in_one_chunk(llava_dir):
    """20 tokens a step: chunked, some chunks end inside an image; with
    disable_chunked_mm_input none does (a chunk stops before the image, which comes whole in
    a later step), and the tokens equal HF's and the chunked run's."""
    images = _images()
    chunked_log, whole_log = [], []
    chunked, _, starts = _generate(llava_dir, images, 20, chunked_log)
    whole, _, _ = _generate(llava_dir, images, 20, whole_log, disable_chunked_mm_input=True)
    assert _chunk_ends_inside_images([e for e in chunked_log if e[0] == "step"], starts)
    assert not _chunk_ends_inside_images([e for e in whole_log if e[0] == "step"], starts)
    assert whole == chunked == hf_greedy(llava_dir, PROMPTS, images, MAX_NEW)


def test_disable_chunked_mm_input_needs_a_step_budget_of_one_image(llava_dir):
    with pytest.raises(ValueError, match="disable_chunked_mm_input.*max_num_batched_tokens to at least 16"):
        LLM(llava_dir, dtype="float32", num_kv_blocks=64, max_num_batched_tokens=8,
            disable_chunked_mm_input=True)
