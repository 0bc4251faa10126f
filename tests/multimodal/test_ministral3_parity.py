"""Ministral 3 (``Mistral3ForConditionalGeneration`` with a ``ministral3`` text config: YaRN
rotary and Llama 4's attention temperature past ``original_max_position_embeddings``) greedy
tokens equal HF transformers' (float32): one and two images and a text-only prompt, with
16-token chunked prefill, so the temperature's steps fall inside and across chunks."""

from __future__ import annotations

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_mistral3 import PROMPT, TEXT, TWO, hf_greedy, image

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)


def test_images_and_text_with_chunked_prefill_match_hf(ministral3_dir):
    prompts = [PROMPT, TWO, TEXT]
    images = [[image(1)], [image(2, (24, 32)), image(3)], []]
    requests = [{"prompt": p, "multi_modal_data": {"image": im}} if im else p
                for p, im in zip(prompts, images)]
    with LLM(ministral3_dir, dtype="float32", num_kv_blocks=128, block_size=4, max_num_batched_tokens=16,
             enable_chunked_prefill=True, limit_mm_per_prompt={"image": 2}) as llm:
        out = llm.generate(requests, GREEDY, use_tqdm=False)
    want = hf_greedy(ministral3_dir, prompts, images, MAX_NEW)
    assert [list(o.outputs[0].token_ids) for o in out] == want
    assert want[0] != want[1]
