"""N-gram speculative decoding with image (and video) prompts: drafts are accepted and the
greedy tokens are HF transformers' (float32) and those of the same engine without
speculation; the proposers that need the image features (draft model, EAGLE, MTP) are
refused by name."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_qwen2_vl import IMAGE, hf_greedy, image

MAX_NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}
# text that repeats, so the n-gram proposer finds drafts in the prompt
REPEAT = "<|im_start|>user\n{}a cat on a mat a cat on a mat a cat<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava"])
def test_ngram_with_images_matches_hf_and_no_speculation(kind, qwen2_vl_dir, llava_dir):
    if kind == "qwen2_vl":
        path, prompt = qwen2_vl_dir, REPEAT.format(IMAGE)
        images = [image(41), image(42, (24, 32))]
        want = hf_greedy(path, [prompt] * 2, [[im] for im in images], MAX_NEW)
    else:
        from tests.multimodal import tiny_llava

        path, prompt = llava_dir, "USER: <image>\na cat on a mat a cat on a mat a cat ASSISTANT:"
        images = [tiny_llava.image(41), tiny_llava.image(42)]
        want = tiny_llava.hf_greedy(path, [prompt] * 2, images, MAX_NEW)
    requests = [{"prompt": prompt, "multi_modal_data": {"image": im}} for im in images]
    outs = {}
    for spec in (None, NGRAM):
        with LLM(path, dtype="float32", num_kv_blocks=128, block_size=4,
                 speculative_config=spec) as llm:
            got = llm.generate(requests, GREEDY, use_tqdm=False)
            if spec is not None:
                assert llm.engine.core.scheduler.spec_stats.num_accepted_tokens > 0
        outs[spec is None] = [list(o.outputs[0].token_ids) for o in got]
    assert outs[True] == outs[False] == want


@pytest.mark.parametrize("method", ["draft_model", "eagle", "mtp"])
def test_proposers_that_need_image_features_are_refused(method, llava_dir):
    spec = {"method": method, "num_speculative_tokens": 2}
    if method != "mtp":
        spec["model"] = llava_dir
    with pytest.raises(ValueError, match=f"speculative_config method '{method}' does not combine "
                                         "with an image model"):
        LLM(llava_dir, dtype="float32", num_kv_blocks=16, speculative_config=spec)
