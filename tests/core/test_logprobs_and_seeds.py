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


def _hf_log_softmax(path: str, prompt: list, tokens: list) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt + tokens])).logits[0].float(), -1)


def test_whole_vocabulary_row_beside_small_k_rows(llm_and_path):
    """One logprobs=-1 request in a batch with k=2 (sampled, seeded), k=0 and no-logprobs ones:
    the -1 rows are sorted on their own (the others keep their small top-k), and every
    request's logprobs equal HF's log-softmax and its own results when it runs alone."""
    llm, path = llm_and_path
    vocab = llm.engine.info.vocab_size
    prompts = [[5, 77, 31, 200], [9, 14, 300, 41, 2], [60, 61, 62], [7, 8]]
    params = [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=-1),
              SamplingParams(max_tokens=4, temperature=1.0, seed=7, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0),
              SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)]
    mixed = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, param, out in zip(prompts, params, mixed):
        alone = llm.generate({"prompt_token_ids": prompt}, param, use_tqdm=False)[0].outputs[0]
        got = out.outputs[0]
        assert got.token_ids == alone.token_ids
        if param.logprobs is None:
            assert got.logprobs is None
            continue
        ref = _hf_log_softmax(path, prompt, got.token_ids)
        for i, (tok, entry, solo) in enumerate(zip(got.token_ids, got.logprobs, alone.logprobs)):
            row = ref[len(prompt) - 1 + i]
            assert {t: (e.logprob, e.rank) for t, e in entry.items()} == \
                   {t: (e.logprob, e.rank) for t, e in solo.items()}
            assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
            assert entry[tok].rank == int((row > row[tok]).sum()) + 1
            k = vocab if param.logprobs == -1 else param.logprobs
            top = sorted((t for t in entry if entry[t].rank <= k), key=lambda t: entry[t].rank)
            assert [entry[t].rank for t in top] == list(range(1, k + 1))
            assert len(entry) == k + (entry[tok].rank > k)  # the top k and the sampled token
            if k:
                got_top = torch.tensor([entry[t].logprob for t in top])
                assert torch.allclose(got_top, row.topk(k).values, atol=1e-4)


def test_sampler_whole_vocabulary_rows_equal_a_batch_wide_topk():
    """The sampler's split (whole-vocabulary rows sorted alone, the others their small k) gives
    the very values and ids of the batch-wide top-k it replaces."""
    from tessellm.core.sampler import Sampler, SamplingBatch

    vocab = 300
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0))
    batch = SamplingBatch(None, True, None, None, None, max_num_logprobs=2, full_logprob_rows=[1, 4],
                          full_num_logprobs=vocab)
    out = Sampler(torch.device("cpu"))(logits, batch)
    ref_lp, ref_ids = torch.log_softmax(logits, -1).topk(vocab, dim=-1)
    assert torch.equal(out.full_ids, ref_ids[[1, 4]]) and torch.equal(out.full_logprobs, ref_lp[[1, 4]])
    assert torch.equal(out.topk_ids, ref_ids[:, :2]) and torch.equal(out.topk_logprobs, ref_lp[:, :2])
    assert out.full_rows == [1, 4] and out.sampled_rank.tolist() == [1] * 6


def test_logprobs_below_minus_one_are_refused_by_name():
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=f"{name} must be None, an integer >= 0 or -1"):
            SamplingParams(**{name: -2})
