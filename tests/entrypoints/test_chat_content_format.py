"""vLLM's ``chat_template_content_format``: how a message's content reaches the chat template.
``string`` joins a message's text parts with newlines; ``openai`` gives the template a list of
parts (a string content becomes one text part); ``auto`` detects ``openai`` when the template
loops over a message's content. ``LLM.chat`` (tiny random Llama, cpu) and the server's
``--chat-template-content-format`` (in process, /tokenize and /v1/chat/completions); each prompt
is checked against HF's ``apply_chat_template`` over the conversation as vLLM parses it."""

from __future__ import annotations

import asyncio

import pytest

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tessellm.entrypoints.chat_utils import detect_content_format
from tessellm.entrypoints.openai.server_config import ServerConfig
from tests.server.in_process import serve

# reads parts when the content is a list, the string otherwise (as many vision templates do)
PARTS = ("{% for m in messages %}{{ m['role'] }}:{% if m['content'] is string %}S[{{ m['content'] }}]"
         "{% else %}{% for p in m['content'] %}P[{{ p['text'] }}]{% endfor %}{% endif %};{% endfor %}")
PLAIN = "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
CONV = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
AS_STRING = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one\ntwo"}]
AS_PARTS = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
ONE = SamplingParams(max_tokens=1, temperature=0)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny random Llama with a small BPE tokenizer beside it."""
    import shutil

    from tests.pooling.conftest import save_tokenizer

    path = str(tmp_path_factory.mktemp("chat-format") / "llama")
    shutil.copytree(tiny_model_dir("llama"), path)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(model_dir, device="cpu", dtype="float32", num_kv_blocks=64) as engine:
        yield engine


def _hf(tok, template: str, conv: list[dict]) -> list[int]:
    text = tok.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=False)
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("template,want", [
    (PLAIN, "string"), (PARTS, "openai"),
    ("{% set msgs = messages[1:] %}{% for m in msgs %}{% for c in m.content | selectattr('type', "
     "'equalto', 'text') %}{{ c.text }}{% endfor %}{% endfor %}", "openai"),  # through set, slice, filter
    # vLLM PRs #42660 / #53824: a loop over a variable named content (Qwen3.5's macro), or over a
    # macro parameter a message's content is passed to (MiMo's render_content(message.content))
    ("{% for c in content %}{{ c }}{% endfor %}", "openai"),
    ("{% macro render(mc) %}{% for c in mc %}{{ c.text }}{% endfor %}{% endmacro %}"
     "{% for m in messages %}{{ render(m.content) }}{% endfor %}", "openai"),
    ("{% macro render(role, mc) %}{% for c in mc %}{{ c.text }}{% endfor %}{% endmacro %}"
     "{% for m in messages %}{{ render(role=m.role, mc=m['content']) }}{% endfor %}", "openai"),
    ("{% macro render(items) %}{% for c in items %}{{ c }}{% endfor %}{% endmacro %}"
     "{% for m in messages %}{{ m.content }}{{ render(m.tools) }}{% endfor %}", "string"),  # not the content
    ("{% for m in messages %", "string"),  # does not parse
    # transformers' assistant-mask tag (not plain Jinja) around a loop over the content
    ("{% for m in messages %}{%- generation -%}{% for c in m.content %}{{ c.text }}{% endfor %}"
     "{%- endgeneration -%}{% endfor %}", "openai"),
])
def test_detect_content_format(template, want):
    assert detect_content_format(template) == want


def test_llm_chat_content_formats(llm):
    tok = llm.get_tokenizer()

    def ids(template, fmt, conv=CONV):
        return list(llm.chat(conv, ONE, use_tqdm=False, chat_template=template, add_generation_prompt=False,
                             chat_template_content_format=fmt)[0].prompt_token_ids)

    assert ids(PARTS, "openai") == ids(PARTS, "auto") == _hf(tok, PARTS, AS_PARTS)
    assert tok.decode(ids(PARTS, "openai")) == "system:P[be brief];user:P[one]P[two];"
    assert ids(PARTS, "string") == _hf(tok, PARTS, AS_STRING)
    assert tok.decode(ids(PARTS, "string")) == "system:S[be brief];user:S[one\ntwo];"
    assert ids(PLAIN, "auto") == ids(PLAIN, "string") == _hf(tok, PLAIN, AS_STRING)  # not the parts' repr
    # a tool result of text parts stays a string, as vLLM gives it (openai format too)
    tool = [{"role": "tool", "content": [{"type": "text", "text": "42"}], "tool_call_id": "c"}]
    assert tok.decode(ids(PARTS, "openai", tool)) == "tool:S[42];"
    # ... and so does a tool result given as a string (vLLM wraps it as a part, then joins it back)
    tool = [{"role": "tool", "content": "42", "tool_call_id": "c"}]
    assert tok.decode(ids(PARTS, "openai", tool)) == "tool:S[42];"
    # vLLM's other text part types: refusal and thinking parts are text parts of their text
    said = [{"role": "assistant", "content": [{"type": "thinking", "thinking": "hm"},
                                              {"type": "refusal", "refusal": "no"}]}]
    assert tok.decode(ids(PARTS, "openai", said)) == "assistant:P[hm]P[no];"
    assert tok.decode(ids(PARTS, "string", said)) == "assistant:S[hm\nno];"
    with pytest.raises(ValueError, match="is text-only: it does not take audio"):
        ids(PARTS, "openai", [{"role": "user", "content": [{"type": "audio_url", "audio_url": "x"}]}])


def test_server_content_format_flag(model_dir):
    from transformers import AutoTokenizer

    path = model_dir
    tok = AutoTokenizer.from_pretrained(path)

    def run(fmt: str) -> tuple[list[int], list[int]]:
        async def scenario(c):
            r = await c.post("/tokenize", json={"model": "m", "messages": CONV, "add_generation_prompt": False})
            assert r.status_code == 200, r.text
            chat = await c.post("/v1/chat/completions", json={
                "model": "m", "messages": CONV, "add_generation_prompt": False, "max_tokens": 1,
                "return_token_ids": True})
            assert chat.status_code == 200, chat.text
            return r.json()["tokens"], chat.json()["prompt_token_ids"]

        config = ServerConfig(["m"], chat_template=PARTS, chat_template_content_format=fmt)
        return asyncio.run(serve(EngineArgs(model=path, device="cpu", num_kv_blocks=64), scenario, config=config))

    parts, strings = run("auto"), run("string")
    assert parts[0] == parts[1] == _hf(tok, PARTS, AS_PARTS)
    assert strings[0] == strings[1] == _hf(tok, PARTS, AS_STRING)
