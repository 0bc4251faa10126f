"""Pixtral 12B's layout (``LlavaForConditionalGeneration`` with a Pixtral tower: one ``[IMG]``
per 4 px patch, no merger, LLaVA's projector with biases) greedy tokens equal HF transformers'
(float32): one and two images and a text-only prompt in one batch, and ``LLM.chat``."""

from __future__ import annotations

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_mistral3 import IMG, IMG_END, PROMPT, TEXT, TWO, hf_greedy, image

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)


def test_images_text_and_chat_match_hf(pixtral_llava_dir):
    prompts = [PROMPT, TWO, TEXT]
    images = [[image(1)], [image(2, (24, 32)), image(3)], []]
    requests = [{"prompt": p, "multi_modal_data": {"image": im}} if im else p
                for p, im in zip(prompts, images)]
    chat = [{"role": "user", "content": [{"type": "image_pil", "image_pil": image(4)},
                                         {"type": "text", "text": "What is this?"}]}]
    with LLM(pixtral_llava_dir, dtype="float32", num_kv_blocks=256, block_size=4,
             limit_mm_per_prompt={"image": 2}) as llm:
        out = llm.generate(requests, GREEDY, use_tqdm=False)
        chatted = llm.chat(chat, GREEDY, use_tqdm=False)
    # a 40x52 image is 10 x 13 patches of 4 px: 10 rows of 13 [IMG], 140 tokens with the breaks
    assert [o.prompt_token_ids.count(IMG) for o in out] == [130, 178, 0]
    assert [o.prompt_token_ids.count(IMG_END) for o in out] == [1, 2, 0]
    want = hf_greedy(pixtral_llava_dir, prompts + [PROMPT], images + [[image(4)]], MAX_NEW)
    assert [list(o.outputs[0].token_ids) for o in out + chatted] == want
    assert want[0] != want[3]
