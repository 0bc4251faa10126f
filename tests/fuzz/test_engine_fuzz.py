"""Seeded random request mixes on the real engine (tiny random llama, cpu backend): every
completed request's tokens equal the same request run alone on a roomy engine, through shared
prefixes, chunked prefill, preemption (a tiny KV cache), aborts at random steps, n>1, seeds, and
allowed_token_ids with bad words."""

from __future__ import annotations

import random

import pytest

from tessellm import LLM, SamplingParams


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}


def random_mix(rng: random.Random, num: int):
    base = [rng.randrange(3, 380) for _ in range(24)]
    prompts, params = [], []
    for i in range(num):
        n = rng.choice([3, 8, 12, 17, 24])  # some block multiples (block size 4)
        head = base[:rng.choice([0, 4, 8, 13])]  # shared prefixes of varied length
        prompt = head + [rng.randrange(3, 380) for _ in range(max(1, n - len(head)))]
        if rng.random() < 0.5:
            p = SamplingParams(max_tokens=rng.randint(1, 24), temperature=0, ignore_eos=True)
        else:
            p = SamplingParams(max_tokens=rng.randint(1, 24), temperature=1.0, seed=rng.randrange(1 << 20),
                               n=rng.choice([1, 2]), ignore_eos=True)
        if rng.random() < 0.35:  # a small allowed set with bad words among its pairs: bans bite
            allowed = rng.sample(range(3, 380), 6)
            p = p.clone(allowed_token_ids=allowed, bad_words_token_ids=[[rng.choice(allowed)] * 2,
                                                                        rng.sample(allowed, 2)])
        prompts.append({"prompt_token_ids": prompt})
        params.append(p)
    return prompts, params


def tokens(out) -> list[list[int]]:
    return [list(c.token_ids) for c in out.outputs]


CASES = [(0, {}), (1, {}), (2, {"enable_prefix_caching": False}),
                                        (3, {"async_scheduling": True}),
                                        (4, {"speculative_config": NGRAM}),
                                        (5, {"speculative_config": NGRAM, "async_scheduling": True})]


@pytest.mark.parametrize("seed,extra", CASES)
def test_random_mix_equals_solo_runs(tiny_model_dir, seed, extra):
    rng = random.Random(seed)
    path = tiny_model_dir("llama")
    prompts, params = random_mix(rng, 8)
    roomy = LLM(path, dtype="float32", enable_prefix_caching=False)
    solo = [tokens(roomy.generate(p, sp, use_tqdm=False)[0]) for p, sp in zip(prompts, params)]
    tight = LLM(path, dtype="float32", num_kv_blocks=12, block_size=4, max_num_batched_tokens=16,
                max_num_seqs=6, **extra)
    engine = tight.engine
    ids = [f"q{i}" for i in range(len(prompts))]
    aborted = set(rng.sample(ids, 2))
    abort_at = {rid: rng.randint(0, 6) for rid in aborted}
    for rid, p, sp in zip(ids, prompts, params):
        engine.add_request(rid, p, sp)
    done, step = {}, 0
    while engine.has_unfinished_requests():
        for rid, at in abort_at.items():
            if at == step:
                engine.abort_request(rid)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    kv = engine.core.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks and not kv.req_blocks
    for i, rid in enumerate(ids):
        if rid in aborted:
            continue
        assert tokens(done[rid]) == solo[i], (rid, prompts[i], params[i])
    assert engine.core.scheduler.num_preemptions_total > 0  # the cache is small enough
    if "speculative_config" in extra:
        assert engine.core.scheduler.spec_stats.num_drafts > 0  # drafts were verified


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 40))
def test_random_mix_equals_solo_runs_many(tiny_model_dir, seed):
    test_random_mix_equals_solo_runs(tiny_model_dir, seed, CASES[seed % len(CASES)][1])
