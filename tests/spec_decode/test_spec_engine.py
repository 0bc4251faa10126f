"""Speculative decoding inside the engine (cpu backend, tiny random Llama): greedy tokens with
n-gram and replay drafts equal those without speculation for a mixed batch (chunked prefill,
several lengths), and preemption, prefix-cache hits and an abort mid-speculation give every
KV block back."""

from __future__ import annotations

from tessellm import LLM, SamplingParams
from tessellm.core.engine_core import EngineCoreRequest

from spec_cases import ENGINE, NGRAM, PROMPTS, generate as _generate


def _spec_llm(model, config, **kw):
    return LLM(model, speculative_config=config, **{**ENGINE, "max_num_batched_tokens": 32, **kw})


def test_ngram_greedy_equals_plain_with_prefix_hits(model, want):
    llm = _spec_llm(model, NGRAM)
    core = llm.engine.core
    try:
        assert _generate(llm) == want
        stats = core.scheduler.spec_stats
        assert stats.num_drafts > 0 and 0 < stats.num_accepted_tokens <= stats.num_draft_tokens
        assert core.kv.num_free_blocks == core.kv.num_blocks
        hits = core.kv.stats.hits
        assert _generate(llm) == want  # the same prompts again: prefix-cache hits
        assert core.kv.stats.hits > hits
        assert core.kv.num_free_blocks == core.kv.num_blocks
    finally:
        llm.shutdown()


def test_replay_greedy_equals_plain_and_accepts_everything(model, want):
    records = [{"prompt_token_ids": p, "output_token_ids": w} for p, w in zip(PROMPTS, want)]
    llm = _spec_llm(model, {"method": "replay", "num_speculative_tokens": 4, "replay_records": records})
    try:
        assert _generate(llm) == want
        stats = llm.engine.core.scheduler.spec_stats
        assert stats.num_accepted_tokens == stats.num_draft_tokens > 0
        assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
    finally:
        llm.shutdown()


def test_preemption_and_load_policy(model, want):
    """Blocks for about one request at a time (preemptions), and speculation off while three or
    more requests run."""
    llm = _spec_llm(model, {**NGRAM, "disable_by_batch_size": 3}, num_kv_blocks=20,
                    max_num_batched_tokens=16)
    core = llm.engine.core
    try:
        assert _generate(llm) == want
        assert core.scheduler.num_preemptions_total > 0 and core.scheduler.spec_stats.num_drafts > 0
        assert core.kv.num_free_blocks == core.kv.num_blocks
    finally:
        llm.shutdown()


def test_abort_mid_speculation_frees_every_block(model):
    llm = _spec_llm(model, NGRAM)
    core = llm.engine.core
    try:
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        for i, p in enumerate(PROMPTS):
            core.add_request(EngineCoreRequest(f"r{i}", p, params, 0.0))
        while core.scheduler.spec_stats.num_drafts < 3:
            core.step()
        drafting = [r for r in core.scheduler.running if r.spec_token_ids]
        assert drafting, "some request holds drafts for the next step"
        core.abort_requests([drafting[0].request_id, "r0"])
        core.step()  # verifies the others' drafts; the runner drops the aborted ones
        core.abort_requests([r.request_id for r in list(core.scheduler.running)])
        while core.has_unfinished_requests():
            core.step()
        assert core.kv.num_free_blocks == core.kv.num_blocks
    finally:
        llm.shutdown()




def test_replay_force_accept_emits_k_plus_one_tokens_per_step(model):
    """Benchmark mode: drafts the target disagrees with (arbitrary recorded tokens) are all
    accepted; every verify step emits k + 1 tokens, the bonus token is the target's greedy
    token after the forced prefix (its K/V came from the verify pass), blocks all come back."""
    k, prompt, n = 3, PROMPTS[0], 13
    recorded = [(37 * i + 11) % 200 + 3 for i in range(n)]
    llm = _spec_llm(model, {"method": "replay", "num_speculative_tokens": k, "force_accept": True,
                            "replay_records": [{"prompt_token_ids": prompt, "output_token_ids": recorded}]})
    core = llm.engine.core
    try:
        core.add_request(EngineCoreRequest("r0", prompt, SamplingParams(max_tokens=n, temperature=0,
                                                                        ignore_eos=True), 0.0))
        per_step, out = [], []
        while core.has_unfinished_requests():
            got = [tok for o in core.step() for tok in o.new_token_ids]
            if got:
                per_step.append(len(got))
                out += got
        assert per_step == [1, k + 1, k + 1, k + 1]  # the prefill's token, then k drafts + bonus
        stats = core.scheduler.spec_stats
        assert stats.num_drafts == 3 and stats.num_accepted_tokens == stats.num_draft_tokens == 3 * k
        assert [out[i] for i in range(n) if i % (k + 1)] == [recorded[i] for i in range(n) if i % (k + 1)]
        assert core.kv.num_free_blocks == core.kv.num_blocks
    finally:
        llm.shutdown()
    plain = LLM(model, **ENGINE)
    try:  # each bonus token is the plain greedy token after the forced tokens before it
        for i in (k + 1, 2 * (k + 1), 3 * (k + 1)):
            got = plain.generate([{"prompt_token_ids": prompt + out[:i]}],
                                 SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), use_tqdm=False)
            assert got[0].outputs[0].token_ids == [out[i]]
    finally:
        plain.shutdown()
