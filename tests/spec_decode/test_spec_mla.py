"""Speculative decoding on a DeepSeek (multi-head latent attention) target: n-gram, a draft
model (a Llama, and the DeepSeek model drafting for itself, so the draft's own cache is a
latent cache too), EAGLE and EAGLE-3 heads. Each drafter builds its own attention kernel and
metadata, so the MLA target's kernel never sees the head's batch nor the head the target's:
greedy tokens equal the target's alone, drafts are proposed, and the self-drafting DeepSeek
gets every draft accepted (its latent cache and kernel run in the draft path)."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.models.test_deepseek import deepseek_config, save_deepseek
from tests.spec_decode.test_draft_proposers import _save_head, _save_llama

HEAD = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
ENGINE = dict(dtype="float32", block_size=4, max_num_batched_tokens=16)
PROMPTS = [[5, 17, 42, 99, 3, 50, 11], [7, 7, 7, 12, 30, 7, 7, 12], list(range(10, 40))]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-mla")
    # 4 layers: EAGLE-3 reads three distinct target layers
    target = save_deepseek(deepseek_config(True, q_lora_rank=24, num_hidden_layers=4),
                           str(root / "ds"))
    return {"target": target, "self": target,
            "draft": _save_llama(str(root / "draft"),
                                 dict(HEAD, num_hidden_layers=1, tie_word_embeddings=False), 2),
            "eagle": _save_head(str(root / "eagle"), "eagle", HEAD, 3),
            "eagle3": _save_head(str(root / "eagle3"), "eagle3", dict(HEAD, num_hidden_layers=4),
                                 4)}


def _greedy(llm) -> list[list[int]]:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _config(method: str, model) -> dict:
    config = {"method": method, "num_speculative_tokens": 3, "disable_by_batch_size": 0}
    if model is None:
        return {**config, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    return {**config, "model": model}


@pytest.fixture(scope="module")
def plain(models):
    with LLM(models["target"], device="cpu", **ENGINE) as llm:
        return _greedy(llm)


@pytest.mark.parametrize("method, draft", [("ngram", None), ("draft_model", "draft"),
                                           ("draft_model", "self"), ("eagle", "eagle"),
                                           ("eagle3", "eagle3")])
def test_speculation_on_mla_target_keeps_greedy_tokens(models, plain, method, draft):
    config = _config(method, models[draft] if draft else None)
    with LLM(models["target"], device="cpu", speculative_config=config, **ENGINE) as llm:
        assert _greedy(llm) == plain
        stats = llm.engine.core.scheduler.spec_stats
        assert stats.num_drafts > 0
        if draft == "self":
            assert stats.num_accepted_tokens == stats.num_draft_tokens > 0


@pytest.mark.slow
@pytest.mark.interpreted
def test_eagle_on_mla_target_emulated_cuda(models):
    """The cuda backend: the target on the Triton MLA kernel, the head on the Triton paged
    kernel, each with its own metadata (Triton in the interpreter on host tensors)."""
    emulated = dict(device="cuda", emulate=True, **ENGINE)
    with LLM(models["target"], **emulated) as llm:
        want = _greedy(llm)
    with LLM(models["target"], speculative_config=_config("eagle", models["eagle"]),
             **emulated) as llm:
        assert _greedy(llm) == want
        assert llm.engine.core.scheduler.spec_stats.num_drafts > 0
