"""vLLM's per-request ``mm_processor_kwargs`` on the tiny random Qwen2-VL (float32, cpu): its
``min_pixels`` / ``max_pixels`` resize the request's images (another grid, another placeholder
count) exactly as HF's image processor does with that ``size``, and the greedy tokens equal HF
generate on those inputs, through ``LLM.chat``, a ``multi_modal_data`` prompt and the chat
server's field; keys a family does not read, and a max_pixels over the checkpoint's (the
encoder budget's), are refused by name."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tessellm.multimodal.processor import image_processor
from tests.multimodal.tiny_qwen2_vl import IMAGE_PAD, PROMPT, hf_greedy, image
from tests.server.in_process import serve

MAX_NEW = 5
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
SMALL = {"max_pixels": 1024}  # the checkpoint's is 4096: a 40x52 image gets a 6x8 grid, not 10x12
SIZE = {"size": {"shortest_edge": 64, "longest_edge": 1024}}  # what HF's image processor is given


def _message(img):
    return {"role": "user", "content": [{"type": "image_pil", "image_pil": img},
                                        {"type": "text", "text": "What is this?"}]}


def test_processor_resizes_as_hf_does(qwen2_vl_dir):
    from transformers import AutoImageProcessor

    processor = image_processor(qwen2_vl_dir, 2)
    [whole] = processor.process(PROMPT, [image(1)])[1]
    ids, [small] = processor.process(PROMPT, [image(1)], mm_kwargs=SMALL)
    hf = AutoImageProcessor.from_pretrained(qwen2_vl_dir)(images=[image(1)], return_tensors="np", **SIZE)
    assert (whole.grid_thw, small.grid_thw) == ([1, 10, 12], [int(v) for v in hf["image_grid_thw"][0]])
    assert small.length == ids.count(IMAGE_PAD) == 1 * 6 * 8 // 4 and small.identifier != whole.identifier
    with pytest.raises(ValueError, match="max_pixels 8192 is over this checkpoint's max_pixels 4096"):
        processor.process(PROMPT, [image(1)], mm_kwargs={"max_pixels": 8192})
    with pytest.raises(ValueError, match="min_pixels 2048 is over max_pixels 1024"):
        processor.process(PROMPT, [image(1)], mm_kwargs={"min_pixels": 2048, **SMALL})
    with pytest.raises(ValueError, match="'fps' not supported for Qwen2VL: it takes min_pixels, max_pixels, do_rescale"):
        processor.process(PROMPT, [image(1)], mm_kwargs={"fps": 2})


def test_llava_refuses_a_size_key(llava_dir):
    with pytest.raises(ValueError, match="'max_pixels' not supported for Llava: it takes do_rescale, "
                                         "rescale_factor, do_normalize, image_mean, image_std, do_convert_rgb"):
        image_processor(llava_dir, 1).check_mm_kwargs(SMALL)


def test_offline_chat_and_prompt_match_hf(qwen2_vl_dir):
    want = hf_greedy(qwen2_vl_dir, [PROMPT], [[image(14)]], MAX_NEW, image_kwargs=SIZE)[0]
    assert want != hf_greedy(qwen2_vl_dir, [PROMPT], [[image(14)]], MAX_NEW)[0]  # the size matters
    with LLM(qwen2_vl_dir, dtype="float32", num_kv_blocks=64, block_size=4) as llm:
        [chat] = llm.chat([_message(image(14))], GREEDY, use_tqdm=False, mm_processor_kwargs=SMALL)
        [prompt] = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": [image(14)]},
                                 "mm_processor_kwargs": SMALL}, GREEDY, use_tqdm=False)
        [text] = llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False,
                          mm_processor_kwargs=SMALL)  # no image: nothing to apply them to, as vLLM
        with pytest.raises(ValueError, match="max_pixels 8192 is over"):
            llm.chat([_message(image(14))], GREEDY, use_tqdm=False, mm_processor_kwargs={"max_pixels": 8192})
        assert not llm.engine.has_unfinished_requests()
    assert list(chat.outputs[0].token_ids) == list(prompt.outputs[0].token_ids) == want
    assert chat.prompt_token_ids.count(IMAGE_PAD) == 12 and text.outputs[0].token_ids


def test_chat_server_field(qwen2_vl_dir):
    buf = io.BytesIO()
    image(14).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                           {"type": "text", "text": "What is this?"}]}
    body = {"model": "m", "messages": [message], "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True,
            "min_tokens": MAX_NEW, "return_token_ids": True}

    async def scenario(c):
        small = await c.post("/v1/chat/completions", json={**body, "mm_processor_kwargs": SMALL})
        bad = await c.post("/v1/chat/completions", json={**body, "mm_processor_kwargs": {"fps": 1}})
        return small, bad

    small, bad = asyncio.run(serve(EngineArgs(model=qwen2_vl_dir, dtype="float32", num_kv_blocks=64,
                                              device="cpu"), scenario))
    assert small.status_code == 200, small.text
    assert small.json()["choices"][0]["token_ids"] == hf_greedy(qwen2_vl_dir, [PROMPT], [[image(14)]], MAX_NEW,
                                                                 image_kwargs=SIZE)[0]
    assert bad.status_code == 400 and "'fps' not supported" in bad.json()["error"]["message"], bad.text


def test_engine_default_under_the_request(qwen2_vl_dir, llava_dir):
    """``LLM(mm_processor_kwargs=...)`` (``--mm-processor-kwargs``): every request starts from
    it, a request's own keys win (vLLM's merge); a key the family does not take fails the
    start, naming it."""
    from tessellm.multimodal.limits import parse_mm_processor_kwargs

    want_small = hf_greedy(qwen2_vl_dir, [PROMPT], [[image(14)]], MAX_NEW, image_kwargs=SIZE)[0]
    want_whole = hf_greedy(qwen2_vl_dir, [PROMPT], [[image(14)]], MAX_NEW)[0]
    prompt = {"prompt": PROMPT, "multi_modal_data": {"image": [image(14)]}}
    with LLM(qwen2_vl_dir, dtype="float32", num_kv_blocks=64, block_size=4,
             mm_processor_kwargs=parse_mm_processor_kwargs('{"max_pixels": 1024}')) as llm:
        [default] = llm.generate(prompt, GREEDY, use_tqdm=False)
        [own] = llm.generate({**prompt, "mm_processor_kwargs": {"max_pixels": 4096}}, GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="min_pixels 2048 is over max_pixels 1024"):  # merged
            llm.generate({**prompt, "mm_processor_kwargs": {"min_pixels": 2048}}, GREEDY, use_tqdm=False)
    assert list(default.outputs[0].token_ids) == want_small and list(own.outputs[0].token_ids) == want_whole
    assert default.prompt_token_ids.count(IMAGE_PAD) == 12 != own.prompt_token_ids.count(IMAGE_PAD)
    with pytest.raises(ValueError, match="'do_pan_and_scan' not supported for Llava"):
        LLM(llava_dir, dtype="float32", num_kv_blocks=16, mm_processor_kwargs={"do_pan_and_scan": True})
    with pytest.raises(ValueError, match="mm_processor_kwargs is not valid JSON"):
        parse_mm_processor_kwargs("{max_pixels: 1}")


PIXELS = {"do_normalize": False, "image_mean": 0.25}  # image_mean is unused without normalizing
MEAN = {"image_mean": [0.1, 0.2, 0.3], "image_std": 0.5, "rescale_factor": 1 / 128}


def test_llava_pixel_keys_match_hf_generate_and_key_the_caches(llava_dir):
    """LLaVA-1.5 takes the pixel-value keys: HF's processor given the same kwargs, HF generate's
    greedy tokens; with prefix caching on, the same prompt ids with other pixels never hit the
    default's blocks (each image's identity is its pixels' hash)."""
    from tests.multimodal.tiny_llava import PROMPT as LLAVA, hf_greedy as llava_greedy, image as llava_image

    want = [llava_greedy(llava_dir, [LLAVA], [llava_image(3)], MAX_NEW, processor_kwargs=kw)[0]
            for kw in ({}, MEAN, {"do_normalize": False})]
    assert len({tuple(w) for w in want}) == 3  # each setting changes the tokens
    prompt = {"prompt": LLAVA, "multi_modal_data": {"image": llava_image(3)}}
    with LLM(llava_dir, dtype="float32", num_kv_blocks=64, block_size=4, enable_prefix_caching=True) as llm:
        got = [llm.generate({**prompt, "mm_processor_kwargs": kw}, GREEDY, use_tqdm=False)[0]
               for kw in ({}, MEAN, {"do_normalize": False})]
        with pytest.raises(ValueError, match="image_std must be a number or 3 numbers .*each > 0"):
            llm.generate({**prompt, "mm_processor_kwargs": {"image_std": [1, 0, 1]}}, GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="'size' not supported for Llava: it takes do_rescale"):
            llm.generate({**prompt, "mm_processor_kwargs": {"size": 30}}, GREEDY, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in got] == want


@pytest.mark.parametrize("family", ["gemma3", "mistral3", "qwen2_vl", "llava_next"])
def test_other_families_pass_the_pixel_keys_as_hf(family, request):
    """Gemma 3, Mistral 3 / Pixtral and the Qwen2-VL family: the pixels are HF's image
    processor's with those kwargs (and differ from the default's)."""
    import numpy as np
    from transformers import AutoImageProcessor

    path = request.getfixturevalue(f"{family}_dir")
    processor = image_processor(path, 1)
    ids = [processor.placeholder_token_id]
    [default] = processor.process(ids, [image(5)])[1]
    [mine] = processor.process(ids, [image(5)], mm_kwargs=MEAN)[1]
    hf = AutoImageProcessor.from_pretrained(path)
    extra = {"patch_size": processor.unit} if family == "mistral3" else {}
    want = np.asarray(hf(images=[image(5)], return_tensors="np", image_mean=[0.1, 0.2, 0.3], image_std=[0.5] * 3,
                         rescale_factor=1 / 128, **extra)["pixel_values"], dtype=np.float32)
    got = np.frombuffer(mine.data, dtype=np.float32)
    assert got.size == want.size and np.allclose(got, want.reshape(-1), atol=1e-5)
    assert mine.identifier != default.identifier
    with pytest.raises(ValueError, match="do_pan_and_scan' not supported for"):
        processor.check_mm_kwargs({"do_pan_and_scan": True})


def test_llama4_refuses_them(llama4_dir):
    """Its image processor leaves the pixel-value keys without effect: refused by name."""
    with pytest.raises(ValueError, match="'image_mean' not supported for Llama4: it processes its inputs "
                                         "with the checkpoint's preprocessor settings"):
        image_processor(llama4_dir, 1).process([0], [image(5)], mm_kwargs={"image_mean": 0.5})
