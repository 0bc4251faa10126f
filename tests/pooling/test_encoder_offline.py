"""Encoder-only models (``models/bert.py``) through LLM.embed / LLM.classify / LLM.score on tiny
random BERT and XLM-RoBERTa checkpoints: embeddings equal HF's pooled last hidden state in
float32 (CLS by default, or as sentence-transformers' files say), several prompts a step and
over several steps; RoBERTa positions skip pad tokens as HF's do; a BERT cross-encoder's score
uses the pair's token types; the engine refuses a step budget that cannot hold a whole prompt
and never reads the prefix cache (a cached key would have missed the later tokens)."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM
from tests.pooling.conftest import random_prompts, with_sentence_transformers
from tests.pooling.encoder_models import hf_hidden, hf_pair_logits, make_encoder

ATOL = 1e-5
PAIRS = [("what is a cat", "a small feline"), ("the quick brown fox", "jumps over the lazy dog"),
         ("what is a cat", "the query about vectors")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-encoders"))


def _llm(path, device="cpu", **kwargs):
    return LLM(path, device=device, num_kv_blocks=64, **kwargs)


def _vectors(outs):
    return torch.tensor([o.outputs.embedding for o in outs])


def _reference(path, prompts, pooling, normalize=True):
    out = []
    for p in prompts:
        hidden = hf_hidden(path, p)
        v = hidden[0] if pooling == "CLS" else hidden.mean(0) if pooling == "MEAN" else hidden[-1]
        out.append(torch.nn.functional.normalize(v, dim=-1) if normalize else v)
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
def test_embeddings_equal_hf(root, kind):
    """CLS and normalized by default (vLLM's default for these models); prompts of 1 to 90
    tokens, several a step, each whole in its step."""
    path = make_encoder(root, kind)
    prompts = random_prompts(8, seed=7, lo=1, hi=90)
    llm = _llm(path)
    got = _vectors(llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False))
    torch.testing.assert_close(got, _reference(path, prompts, "CLS"), atol=ATOL, rtol=0)


def test_sentence_transformers_mean_pooling(root, tmp_path):
    """modules.json + 1_Pooling/config.json (mean, no Normalize module) decide the pooling."""
    path = with_sentence_transformers(make_encoder(root, "bert"), str(tmp_path / "st"), "mean", False)
    prompts = random_prompts(4, seed=8, lo=2, hi=60)
    got = _vectors(_llm(path).embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False))
    torch.testing.assert_close(got, _reference(path, prompts, "MEAN", normalize=False), atol=ATOL, rtol=0)


def test_roberta_positions_skip_pad_tokens(root):
    """XLM-R counts positions from padding_idx + 1 over non-pad tokens (HF's
    create_position_ids_from_input_ids): a pad id inside a prompt takes padding_idx."""
    path = make_encoder(root, "xlmr")
    prompts = [[0, 40, 1, 41, 1, 1, 42, 2], [0, 50, 51, 2]]  # pad_token_id = 1
    got = _vectors(_llm(path, pooler_config={"pooling_type": "MEAN"}).embed(
        [{"prompt_token_ids": p} for p in prompts], use_tqdm=False))
    torch.testing.assert_close(got, _reference(path, prompts, "MEAN"), atol=ATOL, rtol=0)
    assert _llm(path).engine.core.info.max_model_len == 128  # 130 rows, 2 below padding_idx + 1


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
def test_cross_encoder_scores_equal_hf(root, kind):
    """LLM.score on the tokenizer's text pairs (BERT: token types 1 after the first [SEP]) is
    the sigmoid of HF's logit; LLM.classify gives the same probabilities."""
    path = make_encoder(root, kind, num_labels=1)
    llm = _llm(path)
    want = torch.sigmoid(hf_pair_logits(path, PAIRS)[:, 0])
    got = torch.tensor([o.outputs.score for o in llm.score([q for q, _ in PAIRS], [d for _, d in PAIRS],
                                                           use_tqdm=False)])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    one_to_many = llm.score(PAIRS[0][0], [d for _, d in PAIRS], use_tqdm=False)
    want_one = torch.sigmoid(hf_pair_logits(path, [(PAIRS[0][0], d) for _, d in PAIRS])[:, 0])
    torch.testing.assert_close(torch.tensor([o.outputs.score for o in one_to_many]), want_one,
                               atol=ATOL, rtol=0)


def test_classifier_labels_equal_hf_softmax(root):
    """One text as the tokenizer gives it, ``[CLS] ... [SEP]``: token type 0 throughout."""
    path = make_encoder(root, "bert", num_labels=3)
    prompts = [[2] + [t for t in p if t != 3] + [3] for p in random_prompts(3, seed=9)]
    outs = _llm(path).classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.stack([model(torch.tensor([p])).logits[0].softmax(-1) for p in prompts])
    torch.testing.assert_close(torch.tensor([o.outputs.probs for o in outs]), want, atol=ATOL, rtol=0)


def test_step_budget_must_hold_a_whole_prompt(root):
    path = make_encoder(root, "bert")
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(32\) must be at least max_model_len \(128\)"):
        _llm(path, max_num_batched_tokens=32)
    llm = _llm(path, max_num_batched_tokens=128)  # enough: prompts over several steps, none split
    prompts = random_prompts(6, seed=10, lo=40, hi=90)
    got = _vectors(llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False))
    torch.testing.assert_close(got, _reference(path, prompts, "CLS"), atol=ATOL, rtol=0)


def test_no_prefix_cache_hit_under_last_pooling(root):
    """LAST pooling reads no earlier hidden state, yet an encoder's cached keys depend on later
    tokens: a prompt sharing a long prefix with an earlier one is computed whole."""
    path = make_encoder(root, "bert")
    base = random_prompts(1, seed=11, lo=80, hi=80)[0]
    prompts = [base, base[:64] + [7, 8, 9]]
    llm = _llm(path, pooler_config={"pooling_type": "LAST"}, enable_prefix_caching=True)
    first = _vectors(llm.embed([{"prompt_token_ids": prompts[0]}], use_tqdm=False))
    second = _vectors(llm.embed([{"prompt_token_ids": prompts[1]}], use_tqdm=False))
    torch.testing.assert_close(torch.cat([first, second]), _reference(path, prompts, "LAST"), atol=ATOL, rtol=0)


def test_generation_is_refused(root):
    path = make_encoder(root, "bert")
    with pytest.raises(ValueError, match="runner='pooling'"):
        _llm(path, runner="generate")


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=[pytest.mark.slow, pytest.mark.interpreted]), "tpu"])
def test_embeddings_on_emulated_backends(root, device):
    """The same through the cuda backend's Triton kernel (interpreted on the CPU) and the tpu
    backend's bucketed, padded steps (padding rows keep causal limits)."""
    path = make_encoder(root, "bert")
    prompts = random_prompts(4, seed=12, lo=1, hi=70)
    llm = _llm(path, device=device, emulate=True, dtype="float32")
    got = _vectors(llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False))
    torch.testing.assert_close(got, _reference(path, prompts, "CLS"), atol=ATOL, rtol=0)
