"""Qwen2-VL greedy tokens equal HF transformers' (float32): images of different sizes (so
different grids and placeholder counts) and a text-only prompt in one batch, two images in one
prompt, prompts as token ids, M-RoPE positions equal to HF's ``get_rope_index``, chunked
prefill splitting the image tokens (and ``disable_chunked_mm_input`` keeping them whole), and
the prefix cache over images (the same image hits, another of the same size misses)."""

from __future__ import annotations

import numpy as np
import pytest

from tessellm import LLM, SamplingParams
from tests.multimodal.image_requests import generate, image_request as _request
from tests.multimodal.tiny_qwen2_vl import IMAGE, IMAGE_PAD, PROMPT, hf_greedy, hf_inputs, image

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
TWO = f"<|im_start|>user\n{IMAGE} and {IMAGE}Compare them.<|im_end|>\n<|im_start|>assistant\n"
TEXT = "<|im_start|>user\nDescribe a cat.<|im_end|>\n<|im_start|>assistant\n"
BS = 4


def _generate(llm, prompts, images, params=GREEDY):
    return generate(llm, prompts, images, params)


@pytest.fixture(scope="module")
def llm(qwen2_vl_dir):
    with LLM(qwen2_vl_dir, dtype="float32", num_kv_blocks=128, block_size=BS,
             limit_mm_per_prompt={"image": 2}) as llm:
        yield llm


def test_batch_of_sizes_two_images_and_text_matches_hf(llm, qwen2_vl_dir):
    """One batch: two 40x52 images (5x6 merged grid: 30 tokens), a prompt with a 24x32 (3x4:
    12) and a 40x52 image, and a text-only prompt."""
    prompts = [PROMPT, PROMPT, TWO, TEXT]
    images = [[image(1)], [image(2)], [image(3, (24, 32)), image(4)], []]
    got, out = _generate(llm, prompts, images)
    assert [o.prompt_token_ids.count(IMAGE_PAD) for o in out] == [30, 30, 42, 0]
    want = hf_greedy(qwen2_vl_dir, prompts, images, MAX_NEW)
    assert got == want
    assert want[0] != want[1]  # the image decides the output (same text)


def test_prompt_positions_equal_hf_rope_index(qwen2_vl_dir):
    """The runner's M-RoPE table and delta for a prompt with two images of different grids
    are HF's ``get_rope_index`` (positions and ``rope_deltas``)."""
    import torch
    import transformers

    from tessellm.multimodal.mrope import prompt_positions
    from tessellm.multimodal.processor import image_processor

    images = [image(5, (24, 32)), image(6, (48, 24))]
    ids, features = image_processor(qwen2_vl_dir, 2).process(TWO, images)
    table, delta = prompt_positions(len(ids), features, 2)
    inputs = hf_inputs(qwen2_vl_dir, TWO, images)
    assert ids == inputs["input_ids"][0].tolist()
    hf = transformers.Qwen2VLModel.from_pretrained(qwen2_vl_dir)
    with torch.no_grad():
        want, want_delta = hf.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             inputs["image_grid_thw"])
    want = want[:, 0].numpy()
    end = table.shape[1]
    assert (table == want[:, :end]).all()
    assert int(want_delta) == delta < 0
    tail = np.arange(end, len(ids)) + delta  # text after the last image: position + delta
    assert (want[:, end:] == tail).all()


def test_token_id_prompts_expand_to_the_text_prompts_ids(llm, qwen2_vl_dir):
    tok = llm.get_tokenizer()
    images = [image(7, (24, 32)), image(8)]
    one_each = tok.encode(TWO)
    assert one_each.count(IMAGE_PAD) == 2
    got, out = _generate(llm, [one_each], [images])
    assert got == hf_greedy(qwen2_vl_dir, [TWO], [images], MAX_NEW)
    again, _ = _generate(llm, [out[0].prompt_token_ids], [images])  # expanded already
    assert again == got


def test_chunked_prefill_splits_image_tokens(qwen2_vl_dir):
    """8 tokens a step: each 30-token image spans four steps (positions from the prompt table
    in every chunk, the tower once per image); with ``disable_chunked_mm_input`` no step ends
    inside an image. Both equal HF."""
    prompts = [TWO, PROMPT]
    images = [[image(9), image(10, (24, 32))], [image(11)]]
    want = hf_greedy(qwen2_vl_dir, prompts, images, MAX_NEW)
    with LLM(qwen2_vl_dir, dtype="float32", num_kv_blocks=128, block_size=BS, max_num_batched_tokens=8,
             enable_prefix_caching=False, limit_mm_per_prompt={"image": 2}) as llm:
        got, _ = _generate(llm, prompts, images)
        cache = llm.engine.core.runner.encoder_cache
        assert cache.num_encoded == 3 and not cache.features
    assert got == want
    with LLM(qwen2_vl_dir, dtype="float32", num_kv_blocks=128, block_size=BS, max_num_batched_tokens=64,
             enable_prefix_caching=False, limit_mm_per_prompt={"image": 2},
             disable_chunked_mm_input=True) as llm:
        got, _ = _generate(llm, prompts, images)
    assert got == want


def test_prefix_cache_same_image_hits_other_image_misses(qwen2_vl_dir):
    """The same image again reuses its blocks (and the text after it, rotated at the
    positions its image gave it) without running the tower; an image of the same size but
    other pixels shares only the blocks before it."""
    with LLM(qwen2_vl_dir, dtype="float32", num_kv_blocks=128, block_size=BS) as llm:
        cache = llm.engine.core.runner.encoder_cache
        first, a = _generate(llm, [PROMPT], [[image(12)]])
        assert cache.num_encoded == 1
        again, b = _generate(llm, [PROMPT], [[image(12)]])  # equal pixels, a new PIL object
        end = a[0].prompt_token_ids.index(IMAGE_PAD) + 30
        assert b[0].num_cached_tokens >= end and cache.num_encoded == 1
        other, c = _generate(llm, [PROMPT], [[image(13)]])
        offset = a[0].prompt_token_ids.index(IMAGE_PAD)
        assert c[0].prompt_token_ids == a[0].prompt_token_ids
        assert c[0].num_cached_tokens == offset // BS * BS and cache.num_encoded == 2
    want = hf_greedy(qwen2_vl_dir, [PROMPT, PROMPT], [[image(12)], [image(13)]], MAX_NEW)
    assert [first[0], again[0], other[0]] == [want[0], want[0], want[1]]
    assert want[0] != want[1]


def test_chat_with_an_image_matches_hf(llm, qwen2_vl_dir):
    """``LLM.chat`` renders the template's image parts (one <|image_pad|> each), expands them."""
    message = {"role": "user", "content": [{"type": "image_pil", "image_pil": image(14)},
                                           {"type": "text", "text": "What is this?"}]}
    out = llm.chat([message], GREEDY, use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == hf_greedy(qwen2_vl_dir, [PROMPT], [[image(14)]], MAX_NEW)[0]


@pytest.mark.slow  # two worker processes: ~20 s on 2 shared cores
def test_tensor_parallel_two_ranks_with_chunked_prefill(qwen2_vl_dir):
    """Each rank's runner gets the images' grids through the step codec and keeps the same
    M-RoPE positions (16-token chunks through the images)."""
    prompts = [TWO, PROMPT]
    images = [[image(15, (24, 32)), image(16)], [image(17)]]
    with LLM(qwen2_vl_dir, device="cpu", dtype="float32", num_kv_blocks=64, block_size=BS,
             tensor_parallel_size=2, max_num_batched_tokens=16, limit_mm_per_prompt={"image": 2}) as llm:
        got, _ = _generate(llm, prompts, images)
    assert got == hf_greedy(qwen2_vl_dir, prompts, images, MAX_NEW)


def test_flat_config_and_transformers5_weight_names(qwen2_vl_dir, tmp_path):
    """The hub's older config.json (text fields at the top, ``rope_scaling`` of type ``mrope``)
    and weights named as transformers 5 holds them in memory (``model.visual.*``,
    ``model.language_model.*``) load to the same model."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "flat"
    shutil.copytree(qwen2_vl_dir, path)
    config = json.loads((path / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    config.update({k: v for k, v in text.items() if k not in ("model_type", "layer_types")})
    config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    config["rope_theta"] = rope["rope_theta"]
    (path / "config.json").write_text(json.dumps(config))
    weights = load_file(str(path / "model.safetensors"))
    renamed = {("model." + k if k.startswith("visual.") else
                k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
               for k, v in weights.items()}
    assert any(k.startswith("model.language_model.layers.") for k in renamed)
    save_file(renamed, str(path / "model.safetensors"), metadata={"format": "pt"})
    with LLM(str(path), dtype="float32", num_kv_blocks=32, block_size=BS) as flat:
        got, _ = _generate(flat, [PROMPT], [[image(18)]])
    assert got == hf_greedy(qwen2_vl_dir, [PROMPT], [[image(18)]], MAX_NEW)


@pytest.mark.slow  # ~12 s; LLaVA's preemption test covers the shared path in the default lane
def test_preemption_recomputes_positions_and_features(qwen2_vl_dir):
    """A KV cache too small for all three: requests are preempted and resume (their M-RoPE
    entries dropped and made again, the tower rerun), some from the prefix cache inside an
    image; tokens equal HF."""
    prompts = [PROMPT, TWO, PROMPT]
    images = [[image(19)], [image(20, (24, 32)), image(21)], [image(22)]]
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12, ignore_eos=True)
    with LLM(qwen2_vl_dir, dtype="float32", num_kv_blocks=34, block_size=BS, max_num_batched_tokens=16,
             limit_mm_per_prompt={"image": 2}) as llm:
        out = llm.generate([_request(p, im) for p, im in zip(prompts, images)], params, use_tqdm=False)
        core = llm.engine.core
        assert core.scheduler.num_preemptions_total > 0
        assert core.runner.encoder_cache.num_encoded > 4  # recomputed after preemption
    assert [list(o.outputs[0].token_ids) for o in out] == hf_greedy(qwen2_vl_dir, prompts, images, 12)
