"""ModernBERT (``models/modernbert.py``) through LLM.embed / LLM.score on tiny random
checkpoints: embeddings equal HF's in float32 with local layers whose window (|q - k| <= 8) is
shorter than the prompts, so the symmetric window (``layers/symmetric_window.py``) decides the
result (checked: the same weights with global attention everywhere differ); a classifier with
mean pooling scores as HF's does; the Triton kernel (emulated cuda) gives the same."""

from __future__ import annotations

import os

import pytest
import torch

from tessellm import LLM
from tests.pooling.conftest import random_prompts, save_tokenizer

ATOL = 1e-5
TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=256, local_attention=16,
            global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            cls_token_id=1, sep_token_id=2)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from transformers import ModernBertConfig, ModernBertForSequenceClassification, ModernBertModel

    root = str(tmp_path_factory.mktemp("tiny-modernbert"))
    out = {}
    for name, cls, extra in (("embed", ModernBertModel, {}),
                             ("rerank", ModernBertForSequenceClassification,
                              {"num_labels": 1, "classifier_pooling": "mean"})):
        torch.manual_seed(3)
        model = cls(ModernBertConfig(**TINY, **extra)).eval()
        with torch.no_grad():  # HF's init makes every token look alike: spread them
            for n, p in model.named_parameters():
                if "embeddings" in n or "classifier" in n or "head" in n or "Wqkv" in n:
                    p.normal_(0, 0.5)
        out[name] = os.path.join(root, name)
        model.save_pretrained(out[name])
        save_tokenizer(out[name])
    return out


def _hf_hidden(path, prompts, local_attention=None):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    if local_attention is not None:
        config.local_attention = local_attention
    model = AutoModel.from_pretrained(path, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).last_hidden_state[0] for p in prompts]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.slow, pytest.mark.interpreted])])
def test_embeddings_equal_hf(dirs, device):
    path = dirs["embed"]
    prompts = random_prompts(5, seed=1, lo=1, hi=90)
    kwargs = {} if device == "cpu" else {"emulate": True, "dtype": "float32"}
    llm = LLM(path, device=device, num_kv_blocks=64, pooler_config={"pooling_type": "MEAN", "normalize": False},
              **kwargs)
    got = torch.tensor([o.outputs.embedding for o in llm.embed([{"prompt_token_ids": p} for p in prompts],
                                                               use_tqdm=False)])
    want = torch.stack([h.mean(0) for h in _hf_hidden(path, prompts)])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    everywhere = torch.stack([h.mean(0) for h in _hf_hidden(path, prompts, local_attention=512)])
    assert (everywhere - want).abs().max() > 100 * ATOL  # the local window mattered


def test_classifier_mean_pooling_scores_equal_hf(dirs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = dirs["rerank"]
    query, docs = "a query about vectors", ["the cat sat on the mat " * 4, "embeddings and vectors", "fox"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.stack([torch.sigmoid(model(**tok(query, d, return_tensors="pt")).logits[0, 0]) for d in docs])
    llm = LLM(path, device="cpu", num_kv_blocks=64)
    assert llm.engine.core.info.pooling["pooling_type"] == "MEAN"  # config.json's classifier_pooling
    got = torch.tensor([o.outputs.score for o in llm.score(query, docs, use_tqdm=False)])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
