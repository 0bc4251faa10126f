"""Speculative decoding under async scheduling (the next step scheduled while one runs, drafts
reserved for it: tessellm/core/spec_ahead.py), on the cpu backend with a tiny random Llama:
greedy tokens with n-gram, replay and draft-model speculation equal those without
speculation, steps ahead with reserved drafts really run, and preemption, prefix-cache hits
and an abort mid-speculation give every KV block back."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tessellm.core.engine_core import EngineCoreRequest

from spec_cases import ENGINE, NGRAM, PROMPTS, generate as _generate


def _async_llm(model, config, **kw):
    llm = LLM(model, speculative_config=config, async_scheduling=True,
              **{**ENGINE, "max_num_batched_tokens": 32, **kw})
    core = llm.engine.core
    assert core.async_scheduling and core.scheduler.ahead is not None
    core.ahead_steps = []  # per step: drafts reserved for requests scheduled ahead
    core.placeholder_steps = 0  # requests scheduled ahead on the plain path (device feed)
    sched = core.scheduler
    schedule = sched.schedule

    def counting():
        ahead = {r.request_id for r in sched.running if sched.in_flight.samples_ahead(r.request_id)}
        out = schedule()
        core.ahead_steps.append(sum(out.spec_ahead.values()) if out.spec_ahead else -1)
        core.placeholder_steps += len((ahead & set(out.num_scheduled_tokens)) - set(out.spec_ahead))
        return out

    core.scheduler.schedule = counting
    return llm


def _check(llm, full_acceptance=False, some_accepted=True):
    core = llm.engine.core
    stats = core.scheduler.spec_stats
    assert stats.num_drafts > 0 and stats.num_accepted_tokens <= stats.num_draft_tokens
    assert stats.num_accepted_tokens > 0 or not some_accepted
    if full_acceptance:
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    assert any(n > 0 for n in core.ahead_steps), "no step ahead verified drafts"
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_ngram_async_greedy_equals_plain_with_prefix_hits(model, want):
    with _async_llm(model, NGRAM) as llm:
        assert _generate(llm) == want
        _check(llm)
        hits = llm.engine.core.kv.stats.hits
        assert _generate(llm) == want  # the same prompts again: prefix-cache hits
        assert llm.engine.core.kv.stats.hits > hits
        assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks


def test_replay_async_accepts_everything(model, want):
    records = [{"prompt_token_ids": p, "output_token_ids": w} for p, w in zip(PROMPTS, want)]
    with _async_llm(model, {"method": "replay", "num_speculative_tokens": 4, "replay_records": records}) as llm:
        assert _generate(llm) == want
        _check(llm, full_acceptance=True)


@pytest.mark.parametrize("draft", ["same", "random"])
def test_draft_model_async_greedy_equals_plain(model, want, tiny_model_dir, draft):
    """The target drafting for itself (every draft accepted) and another random model (its
    drafts rejected: the target's rejected slots and the draft's own KV are rolled back)."""
    path = model if draft == "same" else tiny_model_dir("qwen2")
    with _async_llm(model, {"method": "draft_model", "model": path, "num_speculative_tokens": 3}) as llm:
        assert _generate(llm) == want
        _check(llm, full_acceptance=draft == "same", some_accepted=draft == "same")


def test_async_preemption_and_load_policy(model, want):
    """Blocks for about one request at a time (preemptions while steps ahead are in flight),
    and speculation off while three or more requests run."""
    with _async_llm(model, {**NGRAM, "disable_by_batch_size": 3}, num_kv_blocks=20,
                    max_num_batched_tokens=16) as llm:
        assert _generate(llm) == want
        assert llm.engine.core.scheduler.num_preemptions_total > 0
        assert llm.engine.core.placeholder_steps > 0  # above the cut-off: no wait for the step before
        _check(llm)


def test_async_abort_mid_speculation_frees_every_block(model):
    with _async_llm(model, NGRAM) as llm:
        core = llm.engine.core
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        for i, p in enumerate(PROMPTS):
            core.add_request(EngineCoreRequest(f"r{i}", p, params, 0.0))
        while core.scheduler.spec_stats.num_drafts < 3:
            core.step()
        assert len(core.in_flight) > 0
        core.abort_requests(["r3", "r0"])  # r3's prompt repeats: it drafts
        core.step()
        core.abort_requests([r.request_id for r in list(core.scheduler.running)])
        while core.has_unfinished_requests():
            core.step()
        assert core.kv.num_free_blocks == core.kv.num_blocks
