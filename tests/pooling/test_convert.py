"""A *ForCausalLM served as a classifier (``convert="classify"``, ``hf_overrides``; vLLM's
``as_seq_cls_model`` and its from-token heads) on tiny random HF checkpoints, against HF
transformers in float32: the from-token logit is the causal LM's logit difference of the two
tokens at the last position (its sigmoid the softmax of the pair: P("yes") of a reranker),
``no_post_processing`` gives those tokens' logits; a checkpoint's own ``score.weight`` is used
when there is one; and the clear errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tessellm import LLM, PoolingParams
from tests.pooling.conftest import hf_logits, random_prompts, save_tokenizer

ATOL = 2e-5


def _llm(path, **kwargs) -> LLM:
    return LLM(path, **{**dict(device="cpu", num_kv_blocks=64, max_num_batched_tokens=32), **kwargs})


def hf_last_logits(model_dir: str, prompts: list[list[int]]) -> torch.Tensor:
    """HF AutoModelForCausalLM's next-token logits at each prompt's last position, float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts])


@pytest.fixture(scope="module")
def causal_with_tokenizer(tiny_model_dir, tmp_path_factory):
    """arch -> a copy of the tiny *ForCausalLM with the small BPE tokenizer (string tokens)."""
    made = {}

    def make(arch: str) -> str:
        if arch not in made:
            path = str(tmp_path_factory.mktemp("tiny-causal-tok") / arch)
            shutil.copytree(tiny_model_dir(arch), path)
            save_tokenizer(path)
            made[arch] = path
        return made[arch]

    return make


@pytest.mark.parametrize("arch", ["qwen3", "llama"])  # tied embeddings, and an untied lm_head
def test_from_2_way_softmax_is_the_causal_lms_yes_probability(arch, causal_with_tokenizer):
    from transformers import AutoTokenizer

    path = causal_with_tokenizer(arch)
    tok = AutoTokenizer.from_pretrained(path)
    no, yes = "the", "cat"  # two single tokens of the tiny vocabulary
    no_id, yes_id = tok.convert_tokens_to_ids(no), tok.convert_tokens_to_ids(yes)
    prompts = random_prompts(5, seed=31)
    # vLLM's recipe for Qwen3-Reranker, and the explicit convert + method spelling
    spellings = [dict(hf_overrides={"architectures": [f"{'Qwen3' if arch == 'qwen3' else 'Llama'}"
                                                      "ForSequenceClassification"],
                                    "classifier_from_token": [no, yes], "is_original_qwen3_reranker": True}),
                 dict(convert="classify", hf_overrides={"classifier_from_token": [no_id, yes_id],
                                                        "method": "from_2_way_softmax"})]
    ref = hf_last_logits(path, prompts)
    diff = ref[:, yes_id] - ref[:, no_id]
    for spelling in spellings:
        with _llm(path, **spelling) as llm:
            info = llm.engine.core.info
            assert info.runner == "pooling" and info.pooling["num_labels"] == 1
            assert info.pooling["use_sep_token"] is False  # an LLM reranker: query + document
            outs = llm.classify([{"prompt_token_ids": p} for p in prompts])
            logits = llm.classify([{"prompt_token_ids": p} for p in prompts], PoolingParams(use_activation=False))
            score = llm.score("the cat sat", ["on the mat", "a query"])
        torch.testing.assert_close(torch.tensor([o.outputs.probs[0] for o in logits]), diff, atol=ATOL, rtol=0)
        probs = torch.tensor([o.outputs.probs[0] for o in outs])
        torch.testing.assert_close(probs, torch.softmax(ref[:, [no_id, yes_id]], -1)[:, 1], atol=ATOL, rtol=0)
        pairs = [tok("the cat sat" + d)["input_ids"] for d in ("on the mat", "a query")]
        pair_ref = hf_last_logits(path, pairs)
        expect = torch.sigmoid(pair_ref[:, yes_id] - pair_ref[:, no_id])
        assert [s.prompt_token_ids for s in score] == pairs
        torch.testing.assert_close(torch.tensor([s.outputs.score for s in score]), expect, atol=ATOL, rtol=0)


def test_no_post_processing_gives_the_tokens_logits(tiny_model_dir):
    path = tiny_model_dir("llama")
    ids = [7, 100, 42]
    prompts = random_prompts(4, seed=32)
    with _llm(path, convert="classify", hf_overrides={"classifier_from_token": ids,
                                                      "method": "no_post_processing"}) as llm:
        assert llm.engine.core.info.pooling["num_labels"] == 3
        got = llm.classify([{"prompt_token_ids": p} for p in prompts], PoolingParams(use_activation=False))
        rows = llm.encode([{"prompt_token_ids": prompts[0]}], pooling_task="token_classify",
                          pooling_params=PoolingParams(use_activation=False))[0].outputs.data
    ref = hf_last_logits(path, prompts)[:, ids]
    torch.testing.assert_close(torch.tensor([o.outputs.probs for o in got]), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(rows[-1], ref[0], atol=ATOL, rtol=0)


def test_convert_classify_uses_the_checkpoints_score_head(classifier_dir, tmp_path):
    """A checkpoint holding score.weight under a *ForCausalLM architecture (vLLM's
    as_seq_cls_model loads it): the logits equal HF's classifier."""
    src = classifier_dir("llama", 2)
    path = str(tmp_path / "causal-named")
    shutil.copytree(src, path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["architectures"] = ["LlamaForCausalLM"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    prompts = random_prompts(4, seed=33)
    with _llm(path, convert="classify") as llm:
        got = llm.classify([{"prompt_token_ids": p} for p in prompts], PoolingParams(use_activation=False))
    torch.testing.assert_close(torch.tensor([o.outputs.probs for o in got]), hf_logits(src, prompts),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs,words", [
    (dict(convert="classify"), "no score.weight"),
    (dict(convert="classify", hf_overrides={"classifier_from_token": [1, 2]}), "needs method"),
    (dict(convert="classify", hf_overrides={"classifier_from_token": [1], "method": "from_2_way_softmax"}),
     "two tokens"),
    (dict(convert="classify", hf_overrides={"classifier_from_token": [1, 999], "method": "from_2_way_softmax"}),
     "outside the vocabulary"),
    (dict(hf_overrides={"classifier_from_token": [1, 2], "method": "from_2_way_softmax"}),
     "give convert='classify'"),
    (dict(convert="classify", runner="generate"), "disagree"),
    (dict(convert="sideways"), "convert 'sideways' is not supported"),
    (dict(hf_overrides="[1]"), "hf_overrides"),
])
def test_bad_convert_is_refused_by_name(kwargs, words, tiny_model_dir):
    with pytest.raises(ValueError, match=words):
        _llm(tiny_model_dir("llama"), **kwargs)


def test_string_token_not_in_the_vocabulary_is_refused(causal_with_tokenizer):
    with pytest.raises(ValueError, match="'zebra-yes' is not one token"):
        _llm(causal_with_tokenizer("qwen3"), convert="classify",
             hf_overrides={"classifier_from_token": ["the", "zebra-yes"], "method": "from_2_way_softmax"})


def test_tensor_parallel_from_token_head(causal_with_tokenizer):
    """Each rank takes the rows from the whole checkpoint tensor: the same head on both."""
    path = causal_with_tokenizer("llama")
    prompts = random_prompts(3, seed=34)
    with _llm(path, convert="classify", tensor_parallel_size=2,
              hf_overrides={"classifier_from_token": [11, 12], "method": "from_2_way_softmax"}) as llm:
        got = llm.classify([{"prompt_token_ids": p} for p in prompts], PoolingParams(use_activation=False))
    ref = hf_last_logits(path, prompts)
    torch.testing.assert_close(torch.tensor([o.outputs.probs[0] for o in got]), ref[:, 12] - ref[:, 11],
                               atol=ATOL, rtol=0)
