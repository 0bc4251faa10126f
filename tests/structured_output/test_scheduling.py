"""The scheduler with constrained requests (real xgrammar matchers over a 5-token vocabulary):
a request waits for its grammar without holding others up, goes ahead of a step in flight only
when its mask can be deferred (and the deferred mask then follows the step's tokens exactly),
its matcher advances with exactly the tokens it is given, and draft tokens get one mask row
each."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from tessellm.core.block_manager import BlockManager
from tessellm.core.request import Request
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.scheduler import Scheduler, SchedulerConfig
from tessellm.core.step import ModelRunnerOutput
from tessellm.core.step import SchedulerOutput
from tessellm.structured_output.compiler import RequestGrammar
from tessellm.structured_output.manager import StructuredOutputManager

xgr = pytest.importorskip("xgrammar")

VOCAB = ["</s>", "a", "b", "c", "d"]  # token 0 ends a sequence
EOS, A, B, C = 0, 1, 2, 3


def compiled(regex: str):
    info = xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS])
    return xgr.GrammarCompiler(info, max_threads=1).compile_regex(regex)


def make(async_scheduling=False, defer_grammar=False):
    return Scheduler(SchedulerConfig(8, 64, 128, async_scheduling=async_scheduling, defer_grammar=defer_grammar),
                     BlockManager(32, 4, True))


def grammar_of(regex):
    future = Future()
    future.set_result(compiled(regex))
    grammar = RequestGrammar(future)
    assert grammar.ready
    return grammar


def manager():
    return StructuredOutputManager(lambda: None, len(VOCAB), [EOS])


def allowed(bitmask, row):
    """The token ids a mask row allows."""
    return [t for t in range(len(VOCAB)) if (int(bitmask[row][t // 32]) >> (t % 32)) & 1]


def req(rid, grammar=None):
    r = Request(rid, [3, 4, 3], SamplingParams(max_tokens=8), eos_token_ids=[EOS])
    r.grammar = grammar
    return r


def update(s, out, token):
    sampled = {rid: [token] for rid in out.num_sampled_tokens}
    return s.update(out, ModelRunnerOutput(sampled))


def test_waits_for_its_grammar_while_others_run():
    s = make()
    future = Future()
    s.add_request(req("g", RequestGrammar(future)))
    s.add_request(req("u"))
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["u"]  # g's compile is not done: u goes ahead
    update(s, out, A)
    future.set_result(compiled("ab"))
    out = s.schedule()
    assert set(out.num_scheduled_tokens) == {"g", "u"}


def test_failed_compile_ends_that_request_alone():
    s = make()
    future = Future()
    future.set_exception(ValueError("structured_outputs.json is invalid: bad"))
    s.add_request(req("g", RequestGrammar(future)))
    s.add_request(req("u"))
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["u"]
    ended = s.take_finished_outputs()
    assert [(o.request_id, o.finish_reason) for o in ended] == [("g", "abort")]
    assert ended[0].stop_reason == "structured_outputs.json is invalid: bad"  # the client's 400


def test_matcher_advances_and_grammar_end_stops():
    s = make()
    future = Future()
    future.set_result(compiled("ab"))
    grammar = RequestGrammar(future)
    s.add_request(req("g", grammar))
    for token in (A, B):
        outs = update(s, s.schedule(), token)
        assert outs[0].finish_reason is None
    outs = update(s, s.schedule(), EOS)
    assert outs[0].finish_reason == "stop" and grammar.is_terminated


def test_token_outside_the_grammar_ends_the_request():
    s = make()
    future = Future()
    future.set_result(compiled("ab"))
    s.add_request(req("g", RequestGrammar(future)))
    outs = update(s, s.schedule(), B)  # the mask would never allow it
    assert outs[0].finish_reason == "stop" and outs[0].stop_reason == "grammar"
    assert outs[0].new_token_ids == []  # a token the grammar refused is never output


def test_constrained_request_is_not_scheduled_ahead():
    s = make(async_scheduling=True)
    future = Future()
    future.set_result(compiled("a+"))
    s.add_request(req("g", RequestGrammar(future)))
    s.add_request(req("u"))
    first = s.schedule()  # prefill of both; both sample
    ahead = s.schedule()  # while the first step runs
    assert set(first.num_scheduled_tokens) == {"g", "u"}
    assert list(ahead.num_scheduled_tokens) == ["u"]  # g's mask needs the token in flight


def test_deferred_mask_follows_the_step_in_flight():
    """Async scheduling with defer_grammar: g goes ahead of its step in flight; its mask for
    the step ahead is filled after that step's token was accepted, and allows exactly what the
    grammar allows after it."""
    s, m = make(async_scheduling=True, defer_grammar=True), manager()
    s.add_request(req("g", grammar_of("ab(cd)?")))
    s.add_request(req("u"))
    first = s.schedule()
    m.fill_bitmask(first, s.requests)
    assert allowed(first.grammar_bitmask, first.grammar_bitmask_rows["g"]) == [A]
    ahead = s.schedule()  # while the first step runs
    assert set(ahead.num_scheduled_tokens) == {"g", "u"}
    assert ahead.num_sampled_tokens == {"g": 1, "u": 1}
    assert m.must_defer(ahead, s.in_flight, s.requests) and not m.must_defer(first, s.in_flight, s.requests)
    update(s, first, A)  # the step before comes back: g's matcher accepts A
    m.fill_bitmask(ahead, s.requests)
    assert allowed(ahead.grammar_bitmask, ahead.grammar_bitmask_rows["g"]) == [B]
    assert "u" not in ahead.grammar_bitmask_rows  # unconstrained rows are left alone
    update(s, ahead, B)
    after = s.schedule()
    m.fill_bitmask(after, s.requests)
    assert allowed(after.grammar_bitmask, after.grammar_bitmask_rows["g"]) == [EOS, C]


def test_draft_rows_walk_and_roll_back():
    """k drafts: k+1 rows, row i after drafts[:i]; a refused draft ends the walk (later rows
    repeat its row: never used) and the matcher is back where it was."""
    m = manager()
    g, h = grammar_of("abab"), grammar_of("c+")
    requests = {"g": type("R", (), {"grammar": g})(), "h": type("R", (), {"grammar": h})()}
    sched = SchedulerOutput([], [], {"h": 1, "g": 4}, 5, num_sampled_tokens={"h": 1, "g": 4},
                            spec_token_ids={"g": [A, B, B]})
    m.fill_bitmask(sched, requests)
    assert sched.grammar_bitmask_rows == {"h": 0, "g": 1}
    rows = [allowed(sched.grammar_bitmask, r) for r in range(5)]
    assert rows == [[C], [A], [B], [A], [A]]  # d2 = B is refused after "ab"
    assert g.accept(A) and not g.accept(A)  # rolled back to the start, then "a" -> only "b"
