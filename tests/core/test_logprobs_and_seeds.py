"""Logprobs equal log-softmax of HF's logits; seeded requests reproduce in any batch."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm_and_path(tiny_model_dir):
    path = tiny_model_dir("llama")
    return LLM(path, dtype="float32"), path


def test_logprobs_match_hf_log_softmax(llm_and_path):
    from transformers import AutoModelForCausalLM

    llm, path = llm_and_path
    prompt = [5, 77, 31, 200, 9, 14, 300]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    tokens = out.outputs[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0]
    ref = torch.log_softmax(logits.float(), -1)
    for i, (tok, entry) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert entry[tok].rank == 1  # greedy
        top = row.topk(3)
        for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[tid].logprob == pytest.approx(lp, abs=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        want = ref[j - 1, prompt[j]].item()
        assert out.prompt_logprobs[j][prompt[j]].logprob == pytest.approx(want, abs=1e-4)
    assert out.outputs[0].cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(tokens, out.outputs[0].logprobs)), abs=1e-4)


def test_seeded_sampling_is_reproducible_in_any_batch(llm_and_path):
    llm, _ = llm_and_path
    target = {"prompt_token_ids": [11, 12, 13, 14]}
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate(target, seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 30, 60)]
    noise = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    mixed = llm.generate(others + [target], [noise] * 3 + [seeded], use_tqdm=False)
    assert mixed[3].outputs[0].token_ids == alone
    unseeded = [llm.generate(target, noise, use_tqdm=False)[0].outputs[0].token_ids for _ in range(3)]
    assert len({tuple(u) for u in unseeded}) > 1


def test_seeded_sampling_survives_preemption(tiny_model_dir):
    path = tiny_model_dir("llama")
    prompts = [{"prompt_token_ids": list(range(1 + i, 40 + i))} for i in range(4)]
    params = [SamplingParams(max_tokens=24, temperature=0.9, seed=i, ignore_eos=True) for i in range(4)]
    roomy = LLM(path, dtype="float32").generate(prompts, params, use_tqdm=False)
    tight_llm = LLM(path, dtype="float32", num_kv_blocks=40, block_size=4)
    tight = tight_llm.generate(prompts, params, use_tqdm=False)
    assert tight_llm.engine.core.scheduler.num_preemptions_total > 0
    assert [o.outputs[0].token_ids for o in tight] == [o.outputs[0].token_ids for o in roomy]


def test_whole_vocabulary_logprobs_match_hf_log_softmax(llm_and_path):
    """vLLM's logprobs=-1 / prompt_logprobs=-1: every token of the vocabulary, each entry HF's
    log-softmax (ranks 1..vocab)."""
    from transformers import AutoModelForCausalLM

    llm, path = llm_and_path
    vocab = llm.engine.info.vocab_size
    prompt = [5, 77, 31, 200]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=-1, prompt_logprobs=-1)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    tokens = out.outputs[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + tokens])).logits[0].float(), -1)
    rows = [(ref[len(prompt) - 1 + i], e) for i, e in enumerate(out.outputs[0].logprobs)]
    rows += [(ref[j - 1], out.prompt_logprobs[j]) for j in range(1, len(prompt))]
    for row, entry in rows:
        assert sorted(entry) == list(range(vocab))
        got = torch.tensor([entry[t].logprob for t in range(vocab)])
        assert torch.allclose(got, row, atol=1e-4)
        assert sorted(e.rank for e in entry.values()) == list(range(1, vocab + 1))


def test_logprobs_below_minus_one_are_refused_by_name():
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=f"{name} must be None, an integer >= 0 or -1"):
            SamplingParams(**{name: -2})
