"""vLLM's ``add_special_tokens`` on a model whose tokenizer adds a BOS (the bundled SmolLM2's
adds none, so the flag could not show there): /v1/completions and /tokenize add the BOS to a
text prompt by default and not with ``add_special_tokens: false``, exactly as the HF tokenizer
does; token-id prompts are never changed; chat uses the template's tokens as they are (vLLM's
default ``add_special_tokens: false``) and, with ``add_special_tokens: true``, the template's
text encoded with the tokenizer's special tokens (BOS first), as vLLM does; likewise /tokenize
with messages and chat-style /v1/embeddings."""

from __future__ import annotations

import os

import httpx
import pytest

BOS = 1
TEXT = "abc cab"


def _make_bos_model(path: str) -> str:
    """A tiny random Llama whose tokenizer prepends <s> (id 1) to every encoded text."""
    import torch
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.tiny_tokenizer import train_bpe

    raw = train_bpe(["abc"], ["<pad>", "<s>", "</s>"], 259)
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).float().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bos_server(server_factory, tmp_path_factory):
    path = _make_bos_model(str(tmp_path_factory.mktemp("bos") / "model"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.encode(TEXT)[0] == BOS and tok.encode(TEXT, add_special_tokens=False)[0] != BOS
    return server_factory([path, "--served-model-name", "m"]), tok


def _post(srv, path, body):
    r = httpx.post(f"{srv.url}{path}", json={"model": "m", **body}, headers=srv.headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("flag", [None, True, False])
def test_completions_and_tokenize_follow_add_special_tokens(bos_server, flag):
    srv, tok = bos_server
    extra = {} if flag is None else {"add_special_tokens": flag}
    want = tok.encode(TEXT, add_special_tokens=flag is not False)
    assert (want[0] == BOS) == (flag is not False)
    assert _post(srv, "/tokenize", {"prompt": TEXT, **extra})["tokens"] == want
    out = _post(srv, "/v1/completions", {"prompt": TEXT, "max_tokens": 1, "temperature": 0,
                                         "return_token_ids": True, **extra})
    assert out["choices"][0]["prompt_token_ids"] == want
    ids = tok.encode(TEXT, add_special_tokens=False)  # token ids are the prompt as given
    out = _post(srv, "/v1/completions", {"prompt": ids, "max_tokens": 1, "return_token_ids": True, **extra})
    assert out["choices"][0]["prompt_token_ids"] == ids


def test_chat_adds_no_special_tokens_to_the_template(bos_server):
    srv, tok = bos_server
    messages = [{"role": "user", "content": TEXT}]
    want = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)
    assert want[0] != BOS
    for extra in ({}, {"add_special_tokens": False}):
        out = _post(srv, "/v1/chat/completions", {"messages": messages, "max_tokens": 1,
                                                  "return_token_ids": True, **extra})
        assert out["prompt_token_ids"] == want
    assert _post(srv, "/tokenize", {"messages": messages})["tokens"] == want


def test_chat_add_special_tokens_true_adds_the_bos(bos_server):
    srv, tok = bos_server
    messages = [{"role": "user", "content": TEXT}]
    want = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=True)
    assert want[0] == BOS and want[1:] == _post(srv, "/tokenize", {"messages": messages})["tokens"]
    out = _post(srv, "/v1/chat/completions", {"messages": messages, "max_tokens": 1,
                                              "return_token_ids": True, "add_special_tokens": True})
    assert out["prompt_token_ids"] == want
    assert _post(srv, "/tokenize", {"messages": messages, "add_special_tokens": True})["tokens"] == want
    # a cut by the tokenizer keeps its BOS (vLLM's left side); an explicit side slices the ids
    for extra, cut in (({}, [BOS, *want[-2:]]), ({"truncation_side": "left"}, want[-3:])):
        out = _post(srv, "/v1/chat/completions", {"messages": messages, "max_tokens": 1, "return_token_ids": True,
                                                  "add_special_tokens": True, "truncate_prompt_tokens": 3, **extra})
        assert out["prompt_token_ids"] == cut


def test_chat_embeddings_follow_add_special_tokens(server_factory, bos_server):
    _, tok = bos_server
    srv = server_factory([tok.name_or_path, "--served-model-name", "m", "--runner", "pooling"])
    messages = [{"role": "user", "content": TEXT}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    for flag in (False, True):
        got = _post(srv, "/v1/embeddings", {"messages": messages, "add_special_tokens": flag})
        ids = tok.encode(text, add_special_tokens=flag)
        want = _post(srv, "/v1/embeddings", {"input": ids})
        assert got["usage"]["prompt_tokens"] == len(ids)
        assert got["data"][0]["embedding"] == want["data"][0]["embedding"]
