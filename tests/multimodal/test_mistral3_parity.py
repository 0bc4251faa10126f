"""Mistral 3 (Pixtral tower) greedy tokens equal HF transformers' (float32): images of
different sizes (so different row layouts and placeholder counts), two in one prompt, and a
text-only prompt in one batch; prompts as token ids; ``LLM.chat``; chunked prefill through
an image's rows."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.multimodal.image_requests import generate
from tests.multimodal.tiny_mistral3 import (IMG, IMG_BREAK, IMG_END, PROMPT, TEXT, TWO, hf_greedy,
                                            hf_inputs, image)

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)


def _generate(llm, prompts, images, params=GREEDY):
    return generate(llm, prompts, images, params)


@pytest.fixture(scope="module")
def llm(mistral3_dir):
    with LLM(mistral3_dir, dtype="float32", num_kv_blocks=128, block_size=4,
             limit_mm_per_prompt={"image": 2}) as llm:
        yield llm


def test_batch_of_sizes_two_images_and_text_matches_hf(llm, mistral3_dir):
    """40x52 images (5 rows of 7 [IMG]: 40 tokens), a prompt with a 24x32 (3 rows of 4: 15)
    and a 40x52 image, and a text-only prompt, in one batch."""
    prompts = [PROMPT, PROMPT, TWO, TEXT]
    images = [[image(1)], [image(2)], [image(3, (24, 32)), image(4)], []]
    got, out = _generate(llm, prompts, images)
    ids = [o.prompt_token_ids for o in out]
    assert [i.count(IMG) for i in ids] == [35, 35, 47, 0]
    assert [i.count(IMG_BREAK) for i in ids] == [4, 4, 6, 0]
    assert [i.count(IMG_END) for i in ids] == [1, 1, 2, 0]
    assert ids[2] == hf_inputs(mistral3_dir, TWO, images[2])["input_ids"][0].tolist()
    want = hf_greedy(mistral3_dir, prompts, images, MAX_NEW)
    assert got == want
    assert want[0] != want[1]  # the image decides the output (same text)


def test_token_id_prompts_expand_to_the_text_prompts_ids(llm, mistral3_dir):
    """One [IMG] per image in token ids expands to the processor's layout; already expanded ids
    pass as they are; a wrong count is refused naming the fix."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mistral3_dir)
    images = [image(5, (24, 32)), image(6)]
    expanded = hf_inputs(mistral3_dir, TWO, images)["input_ids"][0].tolist()
    out = llm.generate([{"prompt_token_ids": tok(TWO)["input_ids"], "multi_modal_data": {"image": images}},
                        {"prompt_token_ids": expanded, "multi_modal_data": {"image": images}}],
                       GREEDY, use_tqdm=False)
    assert out[0].prompt_token_ids == out[1].prompt_token_ids == expanded
    assert out[0].outputs[0].token_ids == out[1].outputs[0].token_ids
    assert list(out[0].outputs[0].token_ids) == hf_greedy(mistral3_dir, [TWO], [images], MAX_NEW)[0]
    with pytest.raises(ValueError, match=r"2 \[IMG\] tokens .* for 1 image"):
        llm.generate({"prompt_token_ids": tok(TWO)["input_ids"], "multi_modal_data": {"image": images[:1]}},
                     GREEDY, use_tqdm=False)


def test_chat_with_two_images_matches_hf(llm, mistral3_dir):
    """``LLM.chat`` renders the template's image parts (one [IMG] each) and expands them."""
    images = [image(7), image(8, (24, 32))]
    message = {"role": "user", "content": [{"type": "image_pil", "image_pil": images[0]},
                                           {"type": "text", "text": " and "},
                                           {"type": "image_pil", "image_pil": images[1]},
                                           {"type": "text", "text": "Compare them."}]}
    out = llm.chat([message], GREEDY, use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == hf_greedy(mistral3_dir, [TWO], [images], MAX_NEW)[0]


def test_chunked_prefill_through_an_images_rows(mistral3_dir):
    """16-token chunks split the image's rows (a chunk ends between [IMG] and [IMG_BREAK] rows):
    the encoder cache gives each chunk its rows, the break rows keep their embeddings."""
    prompts, images = [TWO, PROMPT], [[image(9, (24, 32)), image(10)], [image(11)]]
    with LLM(mistral3_dir, dtype="float32", num_kv_blocks=128, block_size=4, max_num_batched_tokens=16,
             enable_chunked_prefill=True, limit_mm_per_prompt={"image": 2}) as llm:
        got, _ = _generate(llm, prompts, images)
    assert got == hf_greedy(mistral3_dir, prompts, images, MAX_NEW)


def test_transformers5_in_memory_weight_names(mistral3_dir, tmp_path):
    """Weights named as transformers 5 holds them in memory (``model.vision_tower.*``,
    ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``) load to the
    same model as the hub's layout (``language_model.model.*``, ``vision_tower.*``), which
    ``save_pretrained`` writes and the other tests load."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "in-memory"
    shutil.copytree(mistral3_dir, path)
    weights = load_file(str(path / "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in weights)

    def rename(k):
        if k.startswith("language_model.model."):
            return "model.language_model." + k[len("language_model.model."):]
        if k.startswith("language_model.lm_head."):
            return k[len("language_model."):]
        return "model." + k

    save_file({rename(k): v for k, v in weights.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    with LLM(str(path), dtype="float32", num_kv_blocks=32, block_size=4) as llm:
        got, _ = _generate(llm, [PROMPT], [[image(12)]])
    assert got == hf_greedy(mistral3_dir, [PROMPT], [[image(12)]], MAX_NEW)


@pytest.mark.slow  # two worker processes: ~20 s on 2 shared cores
def test_tensor_parallel_two_ranks_with_chunked_prefill(mistral3_dir):
    """The tower replicated on both ranks, the language model split; 16-token chunks."""
    prompts, images = [TWO, PROMPT], [[image(13, (24, 32)), image(14)], [image(15)]]
    with LLM(mistral3_dir, device="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
             tensor_parallel_size=2, max_num_batched_tokens=16, limit_mm_per_prompt={"image": 2}) as llm:
        got, _ = _generate(llm, prompts, images)
    assert got == hf_greedy(mistral3_dir, prompts, images, MAX_NEW)
