"""The scheduler with constrained requests (real xgrammar matchers over a 5-token vocabulary):
a request waits for its grammar without holding others up, is never scheduled ahead of a step
in flight, and its matcher advances with exactly the tokens it is given."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from tessellm.core.block_manager import BlockManager
from tessellm.core.request import Request
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.scheduler import Scheduler, SchedulerConfig
from tessellm.core.step import ModelRunnerOutput
from tessellm.structured_output.compiler import RequestGrammar

xgr = pytest.importorskip("xgrammar")

VOCAB = ["</s>", "a", "b", "c", "d"]  # token 0 ends a sequence
EOS, A, B = 0, 1, 2


def compiled(regex: str):
    info = xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS])
    return xgr.GrammarCompiler(info, max_threads=1).compile_regex(regex)


def make(async_scheduling=False):
    return Scheduler(SchedulerConfig(8, 64, 128, async_scheduling=async_scheduling), BlockManager(32, 4, True))


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
