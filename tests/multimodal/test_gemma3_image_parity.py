"""Gemma 3 with images (``Gemma3ForConditionalGeneration``) against HF transformers in float32
on a tiny random model (SigLIP 8 x 8 patches pooled to 16 soft tokens; one sliding layer of
window 24 and one full layer): greedy tokens for one and two images per prompt and a text-only
prompt in one batch, the first token's log-probabilities (which HF's causal-only mask would
change: the image's tokens attend to each other both ways), token-id prompts, chunked prefill
(never ending a chunk inside an image), prefix-cache hits, and the refusals: more images than
the limit, a token budget smaller than an image, Pan & Scan, a backend whose attention kernel
has no key limits."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.multimodal.image_requests import generate, image_request as _request
from tests.multimodal.tiny_gemma3 import BOI, PROMPT, SOFT, TOKENS, hf_first_logprobs, image
from tests.multimodal.tiny_llava import hf_greedy

ARCH = "Gemma3ForConditionalGeneration"
MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
TWO = ("<start_of_turn>user\n<start_of_image>and<start_of_image>Compare them.<end_of_turn>\n"
       "<start_of_turn>model\n")
TEXT = "<start_of_turn>user\nDescribe a cat.<end_of_turn>\n<start_of_turn>model\n"
BS = 4


def _generate(llm, prompts, images, params=GREEDY):
    return generate(llm, prompts, images, params)


def _llm(path, **kw):
    return LLM(path, dtype="float32", num_kv_blocks=128, block_size=BS,
               limit_mm_per_prompt={"image": 2}, **kw)


@pytest.fixture(scope="module")
def llm(gemma3_dir):
    with _llm(gemma3_dir) as llm:
        yield llm


def test_one_and_two_images_and_text_in_a_batch_match_hf(llm, gemma3_dir):
    prompts = [PROMPT, PROMPT, TWO, TEXT]
    images = [[image(1)], [image(2)], [image(3), image(4, (30, 70))], []]
    got, out = _generate(llm, prompts, images)
    assert [o.prompt_token_ids.count(SOFT) for o in out] == [TOKENS, TOKENS, 2 * TOKENS, 0]
    want = hf_greedy(gemma3_dir, prompts[:3], images[:3], MAX_NEW, architecture=ARCH)
    want.append(_hf_text(gemma3_dir, TEXT))
    assert got == want
    assert want[0] != want[1]  # the image decides the output (same text)


def _hf_text(path, prompt):
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    proc = AutoProcessor.from_pretrained(path)
    inputs = proc.tokenizer(prompt, return_tensors="pt")
    model = Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                             do_sample=False, pad_token_id=0)
    return ids[0, inputs["input_ids"].shape[1]:].tolist()


def test_image_tokens_attend_both_ways_as_hf(llm, gemma3_dir):
    """The first token's log-probabilities equal HF's with the image block mask, and HF's
    causal-only ones differ: the bidirectional attention inside the image is what matches."""
    images = [image(5), image(6)]
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    out = llm.generate([_request(TWO, images)], params, use_tqdm=False)[0].outputs[0]
    ours = {t: lp.logprob for t, lp in out.logprobs[0].items()}
    want = hf_first_logprobs(gemma3_dir, TWO, images)
    causal = hf_first_logprobs(gemma3_dir, TWO, images, bidirectional=False)
    for t, lp in ours.items():
        assert abs(lp - float(want[t])) < 1e-4, (t, lp, float(want[t]))
    assert max(abs(lp - float(causal[t])) for t, lp in ours.items()) > 1e-3


def test_token_id_prompts_expand_start_of_image(llm, gemma3_dir):
    """``<start_of_image>`` once per image in token ids gives the processor's expansion, and
    the expanded ids come back as they are; both generate what the text prompt does."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(gemma3_dir)
    images = [image(7)]
    text_out = llm.generate([_request(PROMPT, images)], GREEDY, use_tqdm=False)[0]
    expanded = list(text_out.prompt_token_ids)
    short = proc.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert short.count(BOI) == 1 and SOFT not in short
    out = llm.generate([{"prompt_token_ids": expanded, "multi_modal_data": {"image": images}}],
                       GREEDY, use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == list(text_out.outputs[0].token_ids)
    out = llm.generate([{"prompt_token_ids": short, "multi_modal_data": {"image": images}}],
                       GREEDY, use_tqdm=False)[0]
    assert list(out.prompt_token_ids).count(SOFT) == TOKENS
    with pytest.raises(ValueError, match="image soft tokens"):
        llm.generate([{"prompt_token_ids": expanded[:-5] + [SOFT] * 3,
                       "multi_modal_data": {"image": images}}], GREEDY, use_tqdm=False)


@pytest.mark.parametrize("budget", [20, 33])
def test_chunked_prefill_keeps_images_whole_and_matches_hf(gemma3_dir, budget):
    """Chunks of at most ``budget`` tokens over a prompt with two 16-token images: no chunk
    ends inside an image (an image token would miss its image's later keys), and the tokens
    are HF's."""
    images = [image(8), image(9)]
    with _llm(gemma3_dir, enable_chunked_prefill=True, max_num_batched_tokens=budget,
              enable_prefix_caching=False) as llm:
        got, _ = _generate(llm, [TWO, PROMPT], [images, [image(10)]])
    assert got == hf_greedy(gemma3_dir, [TWO, PROMPT], [images, [image(10)]], MAX_NEW,
                            architecture=ARCH)


def test_scheduler_never_ends_a_chunk_inside_an_image():
    from tessellm.multimodal.encoder_budget import encoder_budget_args
    from tests.multimodal.tiny_gemma3 import config

    assert encoder_budget_args(config(), 64)["disable_chunked_mm_input"] is True
    with pytest.raises(ValueError, match="attend to the whole image.*at least 16"):
        encoder_budget_args(config(), 12)


def test_prefix_cache_hits_on_the_same_image_only(gemma3_dir):
    with _llm(gemma3_dir, enable_prefix_caching=True) as llm:
        a, _ = _generate(llm, [PROMPT], [[image(11)]])
        b, out_b = _generate(llm, [PROMPT], [[image(11)]])
        c, out_c = _generate(llm, [PROMPT], [[image(12)]])
    ids = list(out_b[0].prompt_token_ids)
    start, end = ids.index(SOFT), ids.index(SOFT) + TOKENS
    assert out_b[0].num_cached_tokens >= end  # the image's blocks came from the cache
    assert out_c[0].num_cached_tokens <= start // BS * BS  # another image: only the text before
    assert a == b
    assert [a[0], c[0]] == hf_greedy(gemma3_dir, [PROMPT, PROMPT], [[image(11)], [image(12)]],
                                     MAX_NEW, architecture=ARCH)


def test_too_many_images_and_pan_and_scan_are_refused(llm, gemma3_dir, tmp_path):
    with pytest.raises(ValueError, match="3 images, over the limit of 2"):
        llm.generate([_request(TWO, [image(1), image(2), image(3)])], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="1 <start_of_image> for 2 image"):
        llm.generate([_request(PROMPT, [image(1), image(2)])], GREEDY, use_tqdm=False)
    assert list(_generate(llm, [TEXT], [[]])[0][0])  # and the engine goes on
    import json
    import os
    import shutil

    path = str(tmp_path / "pas")
    shutil.copytree(gemma3_dir, path)
    cfg = os.path.join(path, "processor_config.json")
    with open(cfg) as f:
        data = json.load(f)
    data["image_processor"]["do_pan_and_scan"] = True
    with open(cfg, "w") as f:
        json.dump(data, f)
    with _llm(path) as pas:
        with pytest.raises(ValueError, match="Pan & Scan"):
            pas.generate([_request(PROMPT, [image(1)])], GREEDY, use_tqdm=False)


def test_refused_on_a_kernel_without_key_limits(gemma3_dir):
    """A backend whose kernel does not declare ``supports_key_limits`` (a plugin of an older
    API) refuses the model at load, naming the feature and the backends that have it."""
    from tessellm.config import resolve_model
    from tessellm.loader.model_loader import build_model
    from tests.backends.backend_plugins import registry_with_old_cpu_kernel

    registry = registry_with_old_cpu_kernel("supports_key_limits")
    with pytest.raises(ValueError, match=r"attend to the whole image.*backend 'cpu' cannot do "
                                         r".*'old'.*supports_key_limits.*backends? that can: cuda"):
        build_model(resolve_model(gemma3_dir), "safetensors", registry, registry.backends["cpu"],
                    torch.float32, torch.device("cpu"), block_size=16)
