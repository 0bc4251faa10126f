"""The scheduler's encoder budget, without torch or a model: requests carrying image
placeholder spans; the assertions are on the schedule (tokens per request, images reached).

Prompt layout of ``img_req`` (16-token images, as the tiny LLaVA of tests/multimodal):

    0 .. 3 text | 4 .. 19 image 0 | 20 .. 23 text | 24 .. 39 image 1 | 40 .. 43 text
"""

from __future__ import annotations

import numpy as np
import pytest

from tessellm.core.block_manager import BlockManager
from tessellm.core.request import Request
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.scheduler import Scheduler, SchedulerConfig
from tessellm.multimodal.inputs import MultiModalFeature
from tests.scheduler_steps import step

IMG = 16


def make(budget, encoder=None, cache=None, chunked=True, blocks=256, whole_images=False):
    encoder = encoder or max(budget, IMG)
    config = SchedulerConfig(16, budget, 512, chunked, max_num_encoder_input_tokens=encoder,
                             encoder_cache_size=cache or encoder,
                             disable_chunked_mm_input=whole_images)
    return Scheduler(config, BlockManager(blocks, 4, True))


def feature(offset, seed, length=IMG):
    pixels = np.full((3, 2, 2), seed, np.float32)
    return MultiModalFeature.from_pixels(pixels, offset, length)


def img_req(rid, seeds=(1, 2), text=4, max_tokens=2):
    ids, feats = [], []
    for seed in seeds:
        ids += list(range(100, 100 + text))
        feats.append(feature(len(ids), seed))
        ids += [3] * IMG
    ids += list(range(200, 200 + text))
    return Request(rid, ids, SamplingParams(max_tokens=max_tokens), eos_token_ids=[0],
                   mm_features=feats)


def encoder_tokens(out, s_requests):
    return sum(s_requests[rid].mm_features[j].length
               for rid, js in out.encoder_inputs.items() for j in js)


def test_chunk_stops_before_an_image_over_the_budget():
    """Budget 16 = one image per step: the first chunk takes image 0 and stops at image 1."""
    s = make(budget=64)  # encoder budget max(64, 16) = 64: both images in one step
    s.add_request(img_req("a"))
    out = step(s)
    assert out.num_scheduled_tokens == {"a": 44} and out.encoder_inputs == {"a": [0, 1]}

    s = make(budget=64, encoder=IMG)
    s.add_request(img_req("a"))
    out = step(s)
    assert out.num_scheduled_tokens == {"a": 24}  # up to image 1's first placeholder
    assert out.encoder_inputs == {"a": [0]}
    out = step(s)
    assert out.num_scheduled_tokens == {"a": 20} and out.encoder_inputs == {"a": [1]}


def test_a_chunk_ending_inside_an_image_keeps_it_cached_until_its_span_is_done():
    """8 tokens a step: image 0 (4..19) is reached in step 1 and encoded there only; the cache
    holds it through step 2 (16..19 end it in step 3); image 1 (24..39) is reached in step 4."""
    s = make(budget=8)
    s.add_request(img_req("a"))
    reached, used = [], []
    while s.requests["a"].num_output_tokens == 0:
        s_requests = dict(s.requests)
        out = step(s)
        reached.append(out.encoder_inputs.get("a", []))
        used.append(encoder_tokens(out, s_requests))
        assert out.num_scheduled_tokens["a"] <= 8
    assert reached == [[0], [], [], [1], [], []]  # 44 tokens: six chunks
    assert max(used) == IMG  # the encoder budget: max(8, 16) tokens a step


def test_disable_chunked_mm_input_ends_no_chunk_inside_an_image():
    """18 tokens a step: chunked, the first chunk ends at 18, inside image 0 (4..19); with
    disable_chunked_mm_input the chunks are 0..3, 4..21, 22..39, 40..43: each image whole. A
    second request waits at its image until a step has room for all of it."""
    s = make(budget=18)
    s.add_request(img_req("a"))
    assert [step(s).num_scheduled_tokens["a"] for _ in range(4)] == [18, 6, 18, 2]
    s = make(budget=18, whole_images=True)
    s.add_request(img_req("a"))
    assert [step(s).num_scheduled_tokens["a"] for _ in range(4)] == [4, 18, 18, 4]
    s = make(budget=18, whole_images=True)
    s.add_request(img_req("a", seeds=(1,)))
    s.add_request(img_req("b", seeds=(2,)))
    steps = [dict(step(s).num_scheduled_tokens) for _ in range(4)]
    # step 2: a's image and 2 text tokens; b, at its image, waits for a step with 16 tokens free
    assert steps == [{"a": 4, "b": 4}, {"a": 18}, {"a": 2, "b": 16}, {"a": 1, "b": 4}]


def test_a_full_cache_defers_the_next_request_image():
    """Cache of one image: while "a" is inside image 0, "b" computes its text and waits at its
    image's first placeholder; it gets the image once "a" is past it."""
    s = make(budget=8, encoder=IMG, cache=IMG)
    s.add_request(img_req("a", seeds=(1,)))
    s.add_request(img_req("b", seeds=(5,)))
    out = step(s)  # a: 0..7 (reaches image 0); b: nothing left of the 8 tokens
    assert out.num_scheduled_tokens == {"a": 8} and out.encoder_inputs == {"a": [0]}
    schedule = []
    while s.requests["a"].num_computed_tokens < 20:
        out = step(s)
        schedule.append((dict(out.num_scheduled_tokens), dict(out.encoder_inputs)))
    # a: 8..15, then 16..19 + 4 text; b never crosses its image's offset (4) meanwhile
    assert schedule[0] == ({"a": 8}, {})
    assert schedule[1][0]["a"] == 8 and schedule[1][0].get("b", 0) == 0
    out = step(s)  # image 0 of "a" is done: "b" may reach its own image now
    assert out.encoder_inputs.get("b") == [0]


def test_equal_images_share_one_encoding_in_the_budget():
    """Two requests with the same image in one step: encoded once, so both fit a budget of
    one image."""
    s = make(budget=64, encoder=IMG)
    s.add_request(img_req("a", seeds=(9,)))
    s.add_request(img_req("b", seeds=(9,)))
    requests = dict(s.requests)
    out = step(s)
    assert out.num_scheduled_tokens == {"a": 24, "b": 24}
    assert out.encoder_inputs == {"a": [0], "b": [0]}
    assert len({requests[r].mm_features[0].identifier for r in "ab"}) == 1


def test_without_chunked_prefill_a_prompt_waits_whole():
    s = make(budget=64, encoder=IMG, chunked=False)
    s.add_request(img_req("a", seeds=(1,)))
    s.add_request(img_req("b", seeds=(2,)))
    out = step(s)
    assert out.num_scheduled_tokens == {"a": 24}  # b's image would exceed: none of b
    out = step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 20}  # its first block: a prefix-cache hit
    assert out.encoder_inputs == {"b": [0]}


def test_an_image_over_the_budget_is_refused_at_add():
    s = make(budget=8, encoder=12)
    with pytest.raises(ValueError, match="image of 16 placeholder tokens exceeds the encoder budget of 12"):
        s.add_request(img_req("a"))
    assert not s.requests


def test_many_requests_never_exceed_the_budgets():
    """Eight two-image requests, 12 tokens a step, encoder budget of two images and a cache of
    two: every step's encoded tokens and held features stay within them, and all finish."""
    s = make(budget=12, encoder=2 * IMG, cache=2 * IMG)
    for i in range(8):
        s.add_request(img_req(f"r{i}", seeds=(10 + 2 * i, 11 + 2 * i), max_tokens=3))
    steps = 0
    while s.has_unfinished():
        requests = dict(s.requests)
        held_before = {f.identifier for r in s.running for f in r.mm_features
                       if f.offset < r.num_computed_tokens < f.end}
        out = step(s)
        new = {requests[r].mm_features[j].identifier for r, js in out.encoder_inputs.items()
               for j in js} - held_before
        assert len(new) * IMG <= 2 * IMG
        assert (len(new) + len(held_before)) * IMG <= 2 * IMG
        steps += 1
        assert steps < 200
