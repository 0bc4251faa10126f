"""LLM.classify and LLM.score on tiny random HF sequence classifiers (Llama, Qwen2, Qwen3) and an
embedding model: probabilities equal HF ``*ForSequenceClassification``'s softmax (sigmoid for
one label) in float32, raw logits with use_activation off (per request or by pooler_config),
a cross-encoder's score is the sigmoid of HF's logit for the tokenizer's text pair, an
embedding model's score is the cosine of HF's embeddings; wrong-task calls are refused by name."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM
from tessellm.pooling import PoolingParams
from tests.pooling.conftest import hf_embeddings, hf_logits, random_prompts

ATOL = 2e-5


def _llm(path, **kwargs):
    return LLM(path, device="cpu", num_kv_blocks=64, max_num_batched_tokens=32, max_model_len=512, **kwargs)


def _probs(outs):
    return torch.tensor([o.outputs.probs for o in outs])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_classify_equals_hf_softmax(classifier_dir, arch):
    path = classifier_dir(arch, 3)
    prompts = random_prompts(6, seed=3)  # mixed lengths, chunked over several steps
    llm = _llm(path)
    outs = llm.classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    logits = hf_logits(path, prompts)
    torch.testing.assert_close(_probs(outs), torch.softmax(logits, -1), atol=ATOL, rtol=0)
    assert all(o.outputs.num_classes == 3 and o.prompt_token_ids == p for o, p in zip(outs, prompts))
    raw = llm.classify([{"prompt_token_ids": p} for p in prompts], PoolingParams(use_activation=False),
                       use_tqdm=False)
    torch.testing.assert_close(_probs(raw), logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="sequence classifier .* does not embed"):
        llm.embed([[5, 6, 7]], use_tqdm=False)
    with pytest.raises(ValueError, match="3 labels; scoring and reranking need a cross-encoder"):
        llm.score("the cat", "the mat", use_tqdm=False)
    with pytest.raises(ValueError, match="dimensions applies to embeddings"):
        llm.classify([[5, 6, 7]], PoolingParams(dimensions=2), use_tqdm=False)


def test_pooler_config_turns_the_activation_off(classifier_dir):
    path = classifier_dir("llama", 3)
    prompts = random_prompts(2, seed=5)
    llm = _llm(path, pooler_config={"softmax": False})  # vLLM's deprecated spelling of use_activation
    torch.testing.assert_close(_probs(llm.classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)),
                               hf_logits(path, prompts), atol=ATOL, rtol=0)


def test_cross_encoder_scores_the_text_pair(classifier_dir):
    from transformers import AutoTokenizer

    path = classifier_dir("qwen2", 1)
    tok = AutoTokenizer.from_pretrained(path)
    query, docs = "a query about vectors", ["the cat sat on the mat", "embeddings and vectors", "fox"]
    pairs = [tok(text=query, text_pair=d)["input_ids"] for d in docs]
    want = torch.sigmoid(hf_logits(path, pairs)[:, 0])
    llm = _llm(path)
    one_to_many = llm.score(query, docs, use_tqdm=False)
    torch.testing.assert_close(torch.tensor([o.outputs.score for o in one_to_many]), want, atol=ATOL, rtol=0)
    assert [o.prompt_token_ids for o in one_to_many] == pairs
    pairwise = llm.score([query] * 3, docs, use_tqdm=False)
    torch.testing.assert_close(torch.tensor([o.outputs.score for o in pairwise]), want, atol=ATOL, rtol=0)
    classified = llm.classify([{"prompt_token_ids": p} for p in pairs], use_tqdm=False)
    torch.testing.assert_close(_probs(classified)[:, 0], want, atol=ATOL, rtol=0)  # sigmoid: one label
    with pytest.raises(ValueError, match="text_1 has 2 texts and text_2 has 3"):
        llm.score([query, query], docs, use_tqdm=False)
    with pytest.raises(ValueError, match="text_2 is empty"):
        llm.score(query, [], use_tqdm=False)


def test_embedding_model_scores_by_cosine(embedding_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedding_model_dir)
    texts = ["a query about vectors", "the cat sat on the mat", "embeddings and vectors"]
    ref = hf_embeddings(embedding_model_dir, [tok.encode(t) for t in texts], "LAST")
    llm = _llm(embedding_model_dir, runner="pooling")
    outs = llm.score(texts[0], texts[1:], use_tqdm=False)
    want = torch.nn.functional.cosine_similarity(ref[:1], ref[1:])
    torch.testing.assert_close(torch.tensor([o.outputs.score for o in outs]), want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="embedding model: it does not classify"):
        llm.classify(["the cat"], use_tqdm=False)


def test_cross_encoder_truncates_the_pair_as_the_tokenizer_does(classifier_dir):
    from transformers import AutoTokenizer

    path = classifier_dir("qwen2", 1)
    tok = AutoTokenizer.from_pretrained(path)
    query, doc = "a query", "the cat sat on the mat " * 30
    want_ids = tok(text=query, text_pair=doc, truncation=True, max_length=12)["input_ids"]
    assert len(want_ids) == 12 and want_ids[:len(tok.encode(query))] == tok.encode(query)  # the query stays
    out = _llm(path).score(query, doc, truncate_prompt_tokens=12, use_tqdm=False)[0]
    assert out.prompt_token_ids == want_ids
    assert out.outputs.score == pytest.approx(float(torch.sigmoid(hf_logits(path, [want_ids])[0, 0])), abs=ATOL)


def test_llm_reranker_without_sep_scores_the_joined_text(classifier_dir, tmp_path):
    """config.json ``use_sep_token: false`` (vLLM's switch for an LLM as reranker): the pair is
    the one text query + document, not the tokenizer's text pair."""
    import json
    import shutil

    from transformers import AutoTokenizer

    path = str(tmp_path / "no-sep")
    shutil.copytree(classifier_dir("qwen2", 1), path)
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    with open(f"{path}/config.json", "w") as f:
        json.dump({**config, "use_sep_token": False}, f)
    tok = AutoTokenizer.from_pretrained(path)
    query, doc = "a query about vec", "tors and the cat"
    joined = tok.encode(query + doc)
    assert joined != tok(text=query, text_pair=doc)["input_ids"]  # the two ways differ here
    out = _llm(path).score(query, doc, use_tqdm=False)[0]
    assert out.prompt_token_ids == joined
    assert out.outputs.score == pytest.approx(float(torch.sigmoid(hf_logits(path, [joined])[0, 0])), abs=ATOL)


def test_lora_adapter_on_a_classifier_equals_merged_hf(classifier_dir, tmp_path):
    """An adapter on the layers (the base score head kept) next to the base model in one batch."""
    from tessellm.lora import LoRARequest
    from tests.lora.adapters import make_adapters, merge_adapter

    path = classifier_dir("llama", 3)
    adapter = make_adapters(path, str(tmp_path / "adapters"), specs={"qv8": (8, ["q_proj", "v_proj"],
                                                                            dict(lora_alpha=16))})["qv8"]
    prompts = random_prompts(4, seed=41, lo=10, hi=40)
    lora = LoRARequest("qv8", 1, adapter)
    with _llm(path, enable_lora=True, max_lora_rank=8) as llm:
        got = _probs(llm.classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False,
                                  lora_request=[lora, None, lora, None]))
    merged = merge_adapter(path, adapter, str(tmp_path / "merged"))
    torch.testing.assert_close(got[0::2], torch.softmax(hf_logits(merged, prompts[0::2]), -1), atol=5e-5, rtol=0)
    torch.testing.assert_close(got[1::2], torch.softmax(hf_logits(path, prompts[1::2]), -1), atol=ATOL, rtol=0)
    assert not torch.allclose(got[0], torch.softmax(hf_logits(path, prompts[:1]), -1)[0], atol=1e-3)
