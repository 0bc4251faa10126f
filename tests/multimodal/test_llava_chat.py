"""Offline chat with images (``LLM.chat`` with image_url / image_pil parts) and the errors a
user gets for images the engine cannot take. Tokens are checked against HF transformers."""

from __future__ import annotations

import os

import pytest

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_llava import FEATURES, PROMPT, data_url, hf_chat_prompt, hf_greedy, image

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llava_dir):
    with LLM(llava_dir, dtype="float32", num_kv_blocks=96, block_size=4,
             limit_mm_per_prompt={"image": 2}, allowed_local_media_path=llava_dir) as llm:
        yield llm


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


def _text(t):
    return {"type": "text", "text": t}


def _tokens(out):
    return [list(o.outputs[0].token_ids) for o in out]


def test_chat_with_a_data_url_matches_hf(llm, llava_dir):
    img = image(30)
    out = llm.chat(_user({"type": "image_url", "image_url": {"url": data_url(img)}}, _text("What is this?")),
                   GREEDY)
    prompt = hf_chat_prompt(llava_dir, "What is this?")
    assert _tokens(out) == hf_greedy(llava_dir, [prompt], [img], MAX_NEW)
    assert out[0].prompt_token_ids.count(3) == FEATURES


def test_chat_with_two_images_and_a_pil_part(llm, llava_dir):
    a, b = image(31), image(32, size=(30, 70))
    out = llm.chat(_user({"type": "image_pil", "image_pil": a},
                         {"type": "image_url", "image_url": {"url": data_url(b, "PNG")}},
                         _text("Compare them.")), GREEDY)
    prompt = hf_chat_prompt(llava_dir, "Compare them.", num_images=2)
    assert _tokens(out) == hf_greedy(llava_dir, [prompt], [[a, b]], MAX_NEW)


def test_string_only_template_gets_the_placeholder_in_the_text(llm, llava_dir):
    """A template that only prints ``content`` as text: the image goes in as ``<image>\\n``."""
    img = image(33)
    template = "{% for m in messages %}USER: {{ m['content'] }} ASSISTANT:{% endfor %}"
    out = llm.chat(_user({"type": "image_url", "image_url": {"url": data_url(img)}}, _text("What is this?")),
                   GREEDY, chat_template=template)
    assert _tokens(out) == hf_greedy(llava_dir, [PROMPT], [img], MAX_NEW)


def test_file_url_under_the_allowed_path(llm, llava_dir, tmp_path):
    img = image(34)
    inside = os.path.join(llava_dir, "cat.png")
    img.save(inside)
    url_part = {"type": "image_url", "image_url": {"url": "file://" + inside}}
    out = llm.chat(_user(url_part, _text("What is this?")), GREEDY)
    assert _tokens(out) == hf_greedy(llava_dir, [hf_chat_prompt(llava_dir, "What is this?")], [img], MAX_NEW)
    outside = tmp_path / "dog.png"
    img.save(outside)
    with pytest.raises(ValueError, match="outside --allowed-local-media-path"):
        llm.chat(_user({"type": "image_url", "image_url": {"url": f"file://{outside}"}}, _text("hi")), GREEDY)


@pytest.mark.parametrize("url,match", [
    ("ftp://example.com/cat.png", "scheme 'ftp' is not supported"),
    ("data:image/png;base64,@@not-base64@@", "not valid base64"),
    ("data:image/png;base64,aGVsbG8gd29ybGQ=", "not an image Pillow can read"),
    ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain'"),
])
def test_bad_image_urls_are_refused(llm, url, match):
    with pytest.raises(ValueError, match=match):
        llm.chat(_user({"type": "image_url", "image_url": {"url": url}}, _text("hi")), GREEDY)


def test_prompt_errors_name_the_problem(llm):
    img = image(35)
    with pytest.raises(ValueError, match="3 images, over the limit of 2"):
        llm.generate({"prompt": "<image><image><image>", "multi_modal_data": {"image": [img] * 3}}, GREEDY)
    with pytest.raises(ValueError, match="2 <image> tokens and 1 images"):  # the HF processor's
        llm.generate({"prompt": "USER: <image><image> hi", "multi_modal_data": {"image": img}}, GREEDY)
    with pytest.raises(ValueError, match=r"5 image placeholder tokens \(id 3\) for 1 image"):
        llm.generate({"prompt_token_ids": [1, 3, 3, 3, 3, 3, 9], "multi_modal_data": {"image": img}}, GREEDY)
    with pytest.raises(ValueError, match="placeholder tokens .* but no image"):
        llm.generate(PROMPT, GREEDY)
    with pytest.raises(ValueError, match="PIL.Image.Image"):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": "cat.png"}}, GREEDY)
    with pytest.raises(ValueError, match="does not place the 1 image"):  # a template that drops content
        llm.chat(_user({"type": "image_pil", "image_pil": img}, _text("hi")), GREEDY,
                 chat_template="{% for m in messages %}{{ m['role'] }}{% endfor %}")
    with pytest.raises(ValueError, match="other modalities are not supported"):
        llm.generate({"prompt": "hi", "multi_modal_data": {"speech": [img]}}, GREEDY)
    with pytest.raises(ValueError, match="takes no audio inputs"):
        llm.generate({"prompt": "hi", "multi_modal_data": {"audio": [img]}}, GREEDY)
    with pytest.raises(ValueError, match="takes no video inputs"):
        llm.generate({"prompt": "hi", "multi_modal_data": {"video": [img]}}, GREEDY)
    text = llm.generate("USER: hi ASSISTANT:", GREEDY)  # no image at all, or an empty list: text
    empty = llm.generate({"prompt": "USER: hi ASSISTANT:", "multi_modal_data": {"image": []}}, GREEDY)
    assert _tokens(text) == _tokens(empty)
    ok = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": img}}, GREEDY)  # still serving
    assert len(ok[0].outputs[0].token_ids) == MAX_NEW


def test_text_only_model_refuses_images(tiny_model_dir):
    with LLM(tiny_model_dir("llama"), dtype="float32", num_kv_blocks=32) as llm:
        with pytest.raises(ValueError, match="text-only: it does not take images"):
            llm.generate({"prompt_token_ids": [1, 2, 3], "multi_modal_data": {"image": image(0)}}, GREEDY)


def test_chat_template_only_in_the_processors_legacy_file(llava_dir, tmp_path):
    """llava-hf keeps the chat template in chat_template.json (the processor's), not with the
    tokenizer: chat still renders, with the processor's template."""
    import json
    import shutil

    from tests.multimodal.tiny_llava import CHAT_TEMPLATE

    path = tmp_path / "legacy"
    shutil.copytree(llava_dir, path)
    (path / "chat_template.jinja").unlink()
    (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    img = image(36)
    with LLM(str(path), dtype="float32", num_kv_blocks=32, block_size=4) as llm:
        out = llm.chat(_user({"type": "image_url", "image_url": {"url": data_url(img)}},
                             _text("What is this?")), GREEDY)
    assert _tokens(out) == hf_greedy(llava_dir, [hf_chat_prompt(llava_dir, "What is this?")], [img], MAX_NEW)


def test_set_tokenizer_adopts_the_processors_chat_template(llm, llava_dir):
    """vLLM's ``set_tokenizer`` with a tokenizer that has no chat template (as llava-hf's): it
    takes the processor's, as the model's own tokenizer does at start, so chat still renders."""
    from transformers import AutoTokenizer

    own = llm.get_tokenizer()
    tok = AutoTokenizer.from_pretrained(llava_dir)
    tok.chat_template = None
    img = image(37)
    try:
        llm.set_tokenizer(tok)
        assert tok.chat_template
        out = llm.chat(_user({"type": "image_url", "image_url": {"url": data_url(img)}},
                             _text("What is this?")), GREEDY)
    finally:
        llm.set_tokenizer(own)
    assert _tokens(out) == hf_greedy(llava_dir, [hf_chat_prompt(llava_dir, "What is this?")], [img], MAX_NEW)
