"""``allowed_token_ids`` and ``bad_words`` on the real engine (tiny random llama with the SmolLM2
tokenizer, cpu, float32): greedy tokens equal HF's argmax under the same restriction, computed
step by step from HF's logits; sampled tokens stay in the set, logprobs stay the raw ones; and
the masks hold under n > 1, seeds, speculative decoding (n-gram and a draft model: equal to
the output without speculation), async scheduling, preemption and structured output."""

from __future__ import annotations

import shutil

import pytest
import torch

from tessellm import LLM, SamplingParams

ENGINE = dict(device="cpu", dtype="float32", seed=0, block_size=4, num_kv_blocks=256)
PROMPTS = ["The quick brown fox", "Once upon a time there was", "1, 2, 3, 4,"]
ALLOWED = sorted(torch.randperm(49152, generator=torch.Generator().manual_seed(3))[:40].tolist())


@pytest.fixture(scope="module")
def llm(tokenized_model):
    with LLM(tokenized_model, **ENGINE) as engine:
        yield engine


@pytest.fixture(scope="module")
def hf(tokenized_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tokenized_model, dtype=torch.float32).eval()


def _greedy(max_tokens=16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _run(llm, params, prompts=PROMPTS):
    return llm.generate(prompts, params, use_tqdm=False)


@torch.no_grad()
def hf_masked_greedy(hf, prompt: list[int], n: int, banned) -> list[int]:
    """HF's greedy tokens when ``banned(output_so_far)`` (token ids) are removed each step."""
    ids, out = list(prompt), []
    for _ in range(n):
        logits = hf(torch.tensor([ids])).logits[0, -1].float()
        logits[sorted(banned(out))] = -float("inf")
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def _outside(allowed):
    return lambda out, _all=set(range(49152)) - set(allowed): _all


def _bad_word_rule(words: list[list[int]]):
    """The ban rule written independently of the engine's: a word's last token is banned when
    the output ends with the word's other tokens."""
    def banned(out):
        return {w[-1] for w in words if len(w) - 1 <= len(out) and out[len(out) - len(w) + 1:] == w[:-1]}
    return banned


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_allowed_token_ids_greedy_is_argmax_over_the_set(llm, hf):
    params = [_greedy(allowed_token_ids=ALLOWED), _greedy(), _greedy(allowed_token_ids=ALLOWED[:3])]
    outs = _run(llm, params)
    plain = _run(llm, _greedy(), PROMPTS[1:2])[0].outputs[0].token_ids
    for out, allowed in zip(outs[::2], (ALLOWED, ALLOWED[:3])):
        tokens = out.outputs[0].token_ids
        assert set(tokens) <= set(allowed)
        assert tokens == hf_masked_greedy(hf, out.prompt_token_ids, 16, _outside(allowed))
    assert outs[1].outputs[0].token_ids == plain  # a row without the restriction is untouched
    assert not set(plain) <= set(ALLOWED)


def test_allowed_token_ids_sampled_with_n_seed_and_raw_logprobs(llm, hf):
    params = SamplingParams(temperature=1.0, top_k=5, n=3, seed=11, max_tokens=12, ignore_eos=True,
                            logprobs=2, allowed_token_ids=ALLOWED[:8])
    first, again = _run(llm, params, PROMPTS[:1]), _run(llm, params, PROMPTS[:1])
    samples = [c.token_ids for c in first[0].outputs]
    assert samples == [c.token_ids for c in again[0].outputs]  # seeded
    assert len({tuple(s) for s in samples}) > 1
    prompt = first[0].prompt_token_ids
    for c in first[0].outputs:
        assert set(c.token_ids) <= set(ALLOWED[:8])
        with torch.no_grad():  # logprobs are the raw model's (vLLM's default), not renormalised
            raw = torch.log_softmax(hf(torch.tensor([prompt + c.token_ids])).logits[0].float(), -1)
        for i, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            assert entry[tok].logprob == pytest.approx(raw[len(prompt) - 1 + i, tok].item(), abs=1e-4)


def _word_and_ids(tokenizer, tokens: list[int], length: int) -> tuple[str, list[int]]:
    """A word made of ``length`` consecutive output tokens that tokenizes back to them after a
    space (so it is a bad word whose spaced form is exactly those tokens)."""
    for i in range(len(tokens) - length + 1):
        ids = tokens[i:i + length]
        text = tokenizer.decode(ids)
        if text.startswith(" ") and text[1:].strip() and tokenizer.encode(text, add_special_tokens=False) == ids:
            return text.strip(), ids
    pytest.fail(f"no {length}-token word in {tokens}")


@pytest.mark.parametrize("length", [1, 2])
def test_bad_words_never_appear_and_greedy_equals_hf(llm, hf, length):
    tokenizer = llm.get_tokenizer()
    plain = _run(llm, _greedy(24), PROMPTS[:1])[0]
    word, ids = _word_and_ids(tokenizer, plain.outputs[0].token_ids, length)
    forms = [tokenizer.encode(t, add_special_tokens=False) for t in (word, " " + word)]
    assert ids in forms
    for given in (word, " " + word):  # a leading space in the request changes nothing
        out = _run(llm, _greedy(24, bad_words=[given, "zzqx unused"]), PROMPTS[:1])[0].outputs[0]
        assert not any(_contains(out.token_ids, f) for f in forms)
        assert out.token_ids == hf_masked_greedy(hf, plain.prompt_token_ids, 24, _bad_word_rule(forms))
        assert out.token_ids != plain.outputs[0].token_ids
    if length == 2:  # only the last token is banned, and only after the first
        assert ids[0] in out.token_ids


def test_bad_words_need_a_tokenizer_and_valid_values(llm, tiny_model_dir):
    with pytest.raises(ValueError, match="allowed_token_ids is empty"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="bad_words must be a list of non-empty strings"):
        SamplingParams(bad_words=["ok", " "])
    with pytest.raises(ValueError, match=r"allowed_token_ids has 49152, outside the vocabulary \[0, 49152\)"):
        _run(llm, _greedy(allowed_token_ids=[1, 49152]), PROMPTS[:1])
    with LLM(tiny_model_dir("llama"), **ENGINE) as plain:  # no tokenizer files
        with pytest.raises(ValueError, match="bad_words need the model's tokenizer"):
            plain.generate({"prompt_token_ids": [1, 2]}, _greedy(bad_words=["x"]), use_tqdm=False)
        out = plain.generate({"prompt_token_ids": [1, 2]}, _greedy(bad_words_token_ids=[[7]]),
                             use_tqdm=False)[0].outputs[0]
        assert 7 not in out.token_ids
    assert _run(llm, _greedy(4), PROMPTS[:1])[0].outputs[0].token_ids  # the engine still serves


def test_a_row_with_nothing_left_to_sample_does_not_fail_the_batch(tiny_model_dir):
    """allowed_token_ids [5] with the bad word [5, 5]: after a 5 every token is masked. The row
    takes token 0 (the argmax of an all -inf row, as a greedy row would) instead of sampling a
    NaN distribution, which failed the step for the whole batch (IndexError). Bans that empty
    allowed_token_ids from the start are refused up front."""
    with LLM(tiny_model_dir("llama"), **ENGINE) as llm:
        def run(params):
            return [o.outputs[0].token_ids for o in llm.generate(
                [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5, 6]}], params, use_tqdm=False)]

        other = SamplingParams(temperature=1.0, seed=9, max_tokens=4, ignore_eos=True)
        alone = run([_greedy(1), other])[1]
        for extra in ({}, {"top_p": 0.5}, {"top_k": 3}, {"logprobs": 2}):
            stuck = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, allowed_token_ids=[5],
                                   bad_words_token_ids=[[5, 5]], **extra)
            assert run([stuck, other]) == [[5, 0, 5, 0], alone]
        for bans, message in (({"bad_words_token_ids": [[5], [6]]}, "also a one-token bad word"),
                              ({"min_tokens": 2, "stop_token_ids": [5, 6]}, "EOS or stop token")):
            with pytest.raises(ValueError, match=message):
                run([_greedy(4, allowed_token_ids=[5, 6], **bans), other])


@pytest.fixture(scope="module")
def reference(llm):
    """A mixed batch whose bans change its output, and its tokens on the plain engine (no
    speculation, sync, roomy cache): row 0 allowed ids, row 1 a two-token bad word its
    unconstrained output contains, row 2 seeded sampling over allowed ids with a banned pair
    that its output without the ban contains."""
    sampled = dict(temperature=0.9, seed=5, max_tokens=24, ignore_eos=True, allowed_token_ids=ALLOWED[:6])
    free = _run(llm, [_greedy(24), _greedy(24), SamplingParams(**sampled)])
    word, pair = _word_and_ids(llm.get_tokenizer(), free[1].outputs[0].token_ids, 2)
    tokens = free[2].outputs[0].token_ids
    banned = tokens[len(tokens) // 2:len(tokens) // 2 + 2]
    params = [_greedy(24, allowed_token_ids=ALLOWED[:6]), _greedy(24, bad_words=[word]),
              SamplingParams(**sampled, bad_words_token_ids=[banned])]
    want = [o.outputs[0].token_ids for o in _run(llm, params)]
    assert not _contains(want[1], pair) and not _contains(want[2], banned)
    assert want[1] != free[1].outputs[0].token_ids and want[2] != tokens
    return params, want


@pytest.mark.parametrize("variant", ["ngram", "draft", "async_ngram", "preempted"])
def test_masks_hold_under_speculation_async_and_preemption(tokenized_model, reference, tmp_path, variant):
    params, want = reference
    kw = dict(ENGINE)
    if variant in ("ngram", "async_ngram"):
        kw["speculative_config"] = {"method": "ngram", "num_speculative_tokens": 3,
                                    "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    if variant == "async_ngram":
        kw["async_scheduling"] = True
    if variant == "draft":
        same = str(tmp_path / "draft")
        shutil.copytree(tokenized_model, same)  # agrees with the target except where masked
        kw["speculative_config"] = {"method": "draft_model", "model": same, "num_speculative_tokens": 3}
    if variant == "preempted":
        kw.update(num_kv_blocks=14, async_scheduling=True)
    with LLM(tokenized_model, **kw) as llm:
        got = [o.outputs[0].token_ids for o in _run(llm, params)]
        sched = llm.engine.core.scheduler
        if variant == "preempted":
            assert sched.num_preemptions_total > 0
        else:
            assert sched.spec_stats.num_drafts > 0 and sched.spec_stats.num_accepted_tokens > 0
    assert got == want


def test_allowed_token_ids_combine_with_structured_output(llm):
    from tessellm.structured_output import StructuredOutputsParams

    pytest.importorskip("xgrammar")
    tokenizer = llm.get_tokenizer()
    choice = StructuredOutputsParams(choice=["yes", "no"])
    for word in ("yes", "no"):
        allowed = tokenizer.encode(word, add_special_tokens=False) + [tokenizer.eos_token_id]
        params = SamplingParams(temperature=0, max_tokens=8, structured_outputs=choice, allowed_token_ids=allowed)
        assert _run(llm, params, PROMPTS[:1])[0].outputs[0].text == word
