"""vLLM's truncation side for a pooling model: its tokenizer is loaded with
``truncation_side="right"``, so ``truncate_prompt_tokens`` (any spelling) keeps a prompt's
*first* k tokens, a text prompt cut by the tokenizer itself (its BOS and EOS stay), whatever side
the checkpoint's tokenizer_config.json names. Checked on a tiny random Llama embedder whose
tokenizer wraps every text in ``<s> ... </s>`` and says ``truncation_side: left``, against HF
AutoModel on what HF's tokenizer keeps with ``truncation_side="right"``; a generating engine on
the same checkpoint keeps the last tokens (its BOS and EOS still there)."""

from __future__ import annotations

import pytest
import torch

from tessellm import SamplingParams
from tessellm.entrypoints.llm import LLM
from tests.pooling.conftest import hf_embeddings

ATOL = 2e-5
BOS, EOS = 1, 2
TEXT = "abc cab bca " * 8
OTHER = "cab abc " * 6
ENGINE = dict(device="cpu", dtype="float32", num_kv_blocks=64, block_size=4)


def _make_model(path: str) -> str:
    import torch as t
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.tiny_tokenizer import train_bpe

    raw = train_bpe(["abc"], ["<pad>", "<s>", "</s>"], 259)
    raw.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                       special_tokens=[("<s>", BOS), ("</s>", EOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  truncation_side="left")
    config = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)
    t.manual_seed(0)
    LlamaForCausalLM(config).float().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoTokenizer

    path = _make_model(str(tmp_path_factory.mktemp("sides") / "model"))
    assert AutoTokenizer.from_pretrained(path).truncation_side == "left"  # the checkpoint's own side
    right = AutoTokenizer.from_pretrained(path, truncation_side="right")  # vLLM's pooling tokenizer
    return path, right


@pytest.fixture(scope="module")
def embedder(model):
    with LLM(model[0], runner="pooling", convert="embed", pooler_config={"pooling_type": "LAST"},
             **ENGINE) as llm:
        yield llm


def _first(right, text: str, k: int) -> list[int]:
    return list(right(text, truncation=True, max_length=k)["input_ids"])


def test_text_keeps_its_first_tokens_and_special_tokens(model, embedder):
    path, right = model
    plain = right.encode(TEXT, add_special_tokens=False)
    want = _first(right, TEXT, 6)
    assert want == [BOS, *plain[:4], EOS]  # what vLLM's right-side tokenizer keeps
    outs = [embedder.embed(TEXT, use_tqdm=False, **kw)[0] for kw in (
        {"truncate_prompt_tokens": 6}, {"tokenization_kwargs": {"truncation": True, "max_length": 6}},
        {"tokenization_kwargs": {"truncate_prompt_tokens": 6}})]
    ref = hf_embeddings(path, [want], "LAST")[0]
    for out in outs:
        assert list(out.prompt_token_ids) == want
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), ref, atol=ATOL, rtol=0)
    # without its special tokens the text is cut the same way: its first 6 tokens
    [bare] = embedder.embed(TEXT, use_tqdm=False, tokenization_kwargs={
        "truncate_prompt_tokens": 6, "add_special_tokens": False})
    assert list(bare.prompt_token_ids) == plain[:6]


def test_token_ids_and_short_cuts_keep_the_first_tokens(model, embedder):
    _, right = model
    ids = right.encode(TEXT)
    [cut] = embedder.embed({"prompt_token_ids": ids}, truncate_prompt_tokens=5, use_tqdm=False)
    assert list(cut.prompt_token_ids) == ids[:5]
    # k under the tokenizer's two special tokens: HF cannot cut, vLLM then slices: [BOS]
    [one] = embedder.embed(TEXT, truncate_prompt_tokens=1, use_tqdm=False)
    assert list(one.prompt_token_ids) == [BOS]
    [reward] = embedder.encode(TEXT, truncate_prompt_tokens=6, pooling_task="token_embed", use_tqdm=False)
    assert reward.outputs.data.shape[0] == 6 and list(reward.prompt_token_ids) == _first(right, TEXT, 6)


def test_embedding_score_cuts_each_side_from_the_right(model, embedder):
    _, right = model
    [out] = embedder.score(TEXT, OTHER, truncate_prompt_tokens=5, use_tqdm=False)
    assert list(out.prompt_token_ids) == _first(right, TEXT, 5) + [0] + _first(right, OTHER, 5)  # pad between


def test_a_generating_engine_keeps_the_last_tokens(model):
    path, right = model
    plain = right.encode(TEXT, add_special_tokens=False)
    with LLM(path, **ENGINE) as llm:
        [out] = llm.generate(TEXT, SamplingParams(max_tokens=1, truncate_prompt_tokens=6), use_tqdm=False)
        [ids] = llm.generate({"prompt_token_ids": right.encode(TEXT)}, SamplingParams(
            max_tokens=1, truncate_prompt_tokens=6), use_tqdm=False)
    assert list(out.prompt_token_ids) == [BOS, *plain[-4:], EOS]  # vLLM's left-side tokenizer
    assert list(ids.prompt_token_ids) == right.encode(TEXT)[-6:]
