"""The memory profile with speculative decoding (``core/memory_profile.py``): the profile step
runs what a verifying step runs after the target's forward: the rejection sampler over every
sampled row where drafts carry their distribution, and a drafter's own forward (draft model,
EAGLE / EAGLE-3 head) over the step's rows and its k - 1 draft steps, then forgets it; the KV
reserve covers a drafter's captured draft steps. On the cpu (no allocator statistics) the
tests count what runs, through the real model and sampler code."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM
from tessellm.core.memory_profile import draft_graph_memory_estimate, profile_shape

from tests.spec_decode.test_draft_proposers import ENGINE, _greedy, _spec, models, plain  # noqa: F401
from tests.spec_decode.test_verify_graphs import StandInGraphRunner

K = 3


def _profile_with_restored_cache(runner, num_tokens: int) -> None:
    """``profile_run`` frees the cache it runs beside; the engine's is put back after it."""
    caches = [(a.k_cache, a.v_cache) for a in runner.kv_layers()]
    runner.profile_run(num_tokens)
    for a in runner.kv_layers():
        assert a.k_cache.shape[0] == 0  # the profile's one block, freed
    for a, (k, v) in zip(runner.kv_layers(), caches):
        a.k_cache, a.v_cache = k, v


@pytest.mark.parametrize("method,draft", [("draft_model", "draft"), ("eagle", "eagle"),
                                          ("eagle3", "eagle3")])
def test_profile_runs_the_drafters_forward_and_forgets_it(models, plain, method, draft):  # noqa: F811
    """The drafter's model runs once over the step's rows (a draft model also the one token
    each request sampled; an EAGLE head from the target's hidden states of the step, kept for
    it), then k - 1 draft decode steps over every row, eagerly; afterwards the engine's greedy
    tokens are those without speculation (nothing of the profile is left in the proposer)."""
    with LLM(models["target"], speculative_config=_spec(method, models[draft], K), **ENGINE) as llm:
        runner = llm.engine.core.runner
        proposer = runner.spec.proposer
        seen = []
        real = proposer.model.forward

        def spy(ids, *rest):
            seen.append(ids.shape[0])
            return real(ids, *rest)

        proposer.model.forward = spy
        try:
            _profile_with_restored_cache(runner, ENGINE["max_num_batched_tokens"])
        finally:
            del proposer.model.forward
        shape = profile_shape(ENGINE["max_num_batched_tokens"], ENGINE["max_num_seqs"],
                              ENGINE["max_model_len"], K)
        rows = len(shape.counts)
        first = shape.num_tokens + (rows if method == "draft_model" else 0)
        assert seen == [first] + [rows] * (K - 1)
        assert runner.spec.profile_tokens == shape.num_tokens
        assert proposer.graph_runner is None and not proposer._capture_tried  # graphs: later
        assert not getattr(proposer, "valid", {})  # the draft model's per-request positions
        assert _greedy(llm) == plain


def test_sampled_rows_reserved_only_for_requests_that_can_verify(tiny_model_dir, monkeypatch):
    """Under ``disable_by_batch_size`` D only the requests of a step that drafted (fewer than
    D) verify drafts: the profile samples ``max_num_seqs + (D - 1) x k`` rows, not
    ``max_num_seqs x (k + 1)`` (Llama-3.1-8B, 256 sequences, k = 3, D = 16: 301 rows of
    ``[rows, vocab]`` sampler tensors instead of 1024), and the scheduler holds the bound when
    more requests hold drafts (from different steps): it verifies D - 1 of them per step."""
    from tessellm.core.block_manager import BlockManager
    from tessellm.core.request import Request
    from tessellm.core.sampling_params import SamplingParams
    from tessellm.core.scheduler import Scheduler, SchedulerConfig
    from tessellm.spec_decode.config import parse_speculative_config

    config = parse_speculative_config({"method": "ngram", "num_speculative_tokens": K,
                                       "disable_by_batch_size": 3})
    assert (config.max_verifying_seqs(8), config.max_verifying_seqs(1)) == (2, 1)
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": K,
                                     "disable_by_batch_size": 0}).max_verifying_seqs(8) == 8
    assert profile_shape(64, 8, 64, K, 2).sampled_rows == 8 + 2 * K
    assert profile_shape(64, 8, 64, K).sampled_rows == 8 * (K + 1)  # no limit: every row
    assert profile_shape(10, 8, 64, K, 2).sampled_rows == 10  # at most the step's tokens

    seen = []
    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", max_model_len=64,
              max_num_seqs=8, max_num_batched_tokens=64,
              speculative_config={"method": "ngram", "num_speculative_tokens": K,
                                  "disable_by_batch_size": 3})
    runner = llm.engine.core.runner
    real = runner.model.compute_logits
    monkeypatch.setattr(runner.model, "compute_logits",
                        lambda hidden: seen.append(hidden.shape[0]) or real(hidden))
    runner.profile_run(64)
    assert seen == [64, 8 + 2 * K]  # one prompt-logprob chunk, then the sampled rows
    llm.shutdown()

    sched = Scheduler(SchedulerConfig(8, 64, 64, num_speculative_tokens=K,
                                      disable_by_batch_size=3), BlockManager(64, 4, True))
    for i in range(4):
        sched.add_request(Request(f"r{i}", [5 + i] * 6, SamplingParams(max_tokens=20),
                                  eos_token_ids=[0]))
    out = sched.schedule()
    sched.update(out, {rid: [9] for rid in out.num_scheduled_tokens})
    for r in sched.running:  # each holds drafts (as after steps that drafted)
        r.spec_token_ids = [9] * K
    out = sched.schedule()
    assert len(out.spec_token_ids) == 2 and sum(out.num_scheduled_tokens.values()) == 4 + 2 * K


def test_profile_rejection_samples_every_row_when_drafts_carry_a_distribution(tiny_model_dir,
                                                                             monkeypatch):
    """A proposer whose drafts come with their distribution gets the rejection sampler run over
    the profile's ``max_num_seqs x (k + 1)`` sampled rows: target and draft probabilities
    ``[rows, vocab]``, every request verifying k drafts (its last row the bonus row); one with
    point-mass drafts (n-gram) never reaches it, in the profile as in its steps. The engine's
    sampler draws stay those of its seed."""
    from tessellm.spec_decode import rejection

    calls = []
    real = rejection.rejection_sample

    def counting(target_probs, draft_ids, draft_probs=None, has_draft_probs=None, *rest):
        calls.append((target_probs.shape, draft_ids.clone(), draft_probs, has_draft_probs.clone()))
        return real(target_probs, draft_ids, draft_probs, has_draft_probs, *rest)

    monkeypatch.setattr(rejection, "rejection_sample", counting)
    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", max_model_len=64,
              max_num_seqs=5, max_num_batched_tokens=64,
              speculative_config={"method": "ngram", "num_speculative_tokens": K})
    runner = llm.engine.core.runner
    runner.profile_run(64)
    assert calls == []  # n-gram drafts are point masses
    runner.spec.proposer.draft_distributions = True
    generator = runner.sampler.generator.get_state()
    runner.profile_run(64)
    (shape, ids, probs, has), = calls
    rows = profile_shape(64, 5, 64, K).sampled_rows
    assert rows == 5 * (K + 1) and shape == (rows, runner.vocab_size)
    assert ids.view(5, K + 1)[:, -1].eq(-1).all() and ids.view(5, K + 1)[:, :-1].ge(0).all()
    assert probs.shape == shape and torch.allclose(probs[has].sum(-1), torch.ones(5 * K))
    assert has.view(5, K + 1)[:, :-1].all() and not has.view(5, K + 1)[:, -1].any()
    assert torch.equal(runner.sampler.generator.get_state(), generator)
    llm.shutdown()


def test_draft_graph_reserve_covers_the_draft_steps_outputs_and_logits(models):  # noqa: F811
    """The reserve for an EAGLE head's captured draft steps (a graph per bucket under the load
    policy's cut-off, each keeping the draft ids and the head's hidden state) covers what those
    graphs keep and the largest one's logits; the worker adds it to the decode graphs'."""
    spec = dict(_spec("eagle", models["eagle"], K), disable_by_batch_size=16)
    with LLM(models["target"], speculative_config=spec, **dict(ENGINE, max_num_seqs=16)) as llm:
        runner = llm.engine.core.runner
        proposer = runner.spec.proposer
        _profile_with_restored_cache(runner, ENGINE["max_num_batched_tokens"])
        assert runner.spec.graph_memory_estimate(runner.logits_row_bytes) == 0  # cpu: no graphs
        sizes = (1, 2, 4, 8, 12)  # verify_graphs.capture_sizes(16, 16)
        proposer._make_graph_runner = lambda: StandInGraphRunner(sizes)
        reserve = runner.spec.graph_memory_estimate(runner.logits_row_bytes)
        proposer.capture_graphs()
        kept = 0
        for n in sizes:
            kept += sum(t.nbytes for t in proposer._graph_step(*proposer.graph_runner.static[n]))
        hidden = torch.zeros(max(sizes), runner.model.config.hidden_size)
        logits = runner.model.compute_logits(hidden).nbytes
        assert reserve >= kept + logits > 0
        assert reserve == draft_graph_memory_estimate(sizes, 8 + 4 * proposer.hidden_size,
                                                      runner.logits_row_bytes,
                                                      runner.spec.profile_peak_bytes / 24)


def test_draft_graph_reserve_sizes_an_eagle3_heads_logits_by_its_draft_vocabulary(models):  # noqa: F811
    """An EAGLE-3 head's draft steps compute logits over its own draft vocabulary (96 rows of
    its LM head, against the target's 384): the reserve sizes them so, not by the target's row."""
    spec = dict(_spec("eagle3", models["eagle3"], K), disable_by_batch_size=16)
    with LLM(models["target"], speculative_config=spec, **dict(ENGINE, max_num_seqs=16)) as llm:
        runner = llm.engine.core.runner
        proposer = runner.spec.proposer
        _profile_with_restored_cache(runner, ENGINE["max_num_batched_tokens"])
        sizes = (1, 2, 4, 8, 12)
        proposer._make_graph_runner = lambda: StandInGraphRunner(sizes)
        reserve = runner.spec.graph_memory_estimate(runner.logits_row_bytes)
        states = torch.zeros(1, proposer.hidden_size)
        row = proposer.model.lm_head(states).nbytes  # the head's logits: one row
        assert proposer.draft_vocab_size == 96 and row == 96 * 4 < runner.logits_row_bytes
        per_token = runner.spec.profile_peak_bytes / runner.spec.profile_tokens
        assert reserve == draft_graph_memory_estimate(sizes, 8 + 4 * proposer.hidden_size, row, per_token)



def test_profile_drafter_stays_inside_the_context(models):  # noqa: F811
    """Profile rows that fill the context sample nothing (as no real step's could): the draft
    model is fed their tokens, none past ``max_model_len``, and drafts for none of them."""
    engine = dict(ENGINE, max_model_len=16, max_num_seqs=2, max_num_batched_tokens=32)
    with LLM(models["target"], speculative_config=_spec("draft_model", models["draft"], K), **engine) as llm:
        runner = llm.engine.core.runner
        proposer = runner.spec.proposer
        seen = []
        real = proposer.model.forward

        def spy(ids, positions, *rest):
            seen.append((ids.shape[0], int(positions.max())))
            return real(ids, positions, *rest)

        proposer.model.forward = spy
        try:
            _profile_with_restored_cache(runner, 32)
        finally:
            del proposer.model.forward
        assert profile_shape(32, 2, 16, K).counts == (16, 16)
        assert seen == [(32, 15)]  # both prompts fed, no draft step
