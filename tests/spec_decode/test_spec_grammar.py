"""Structured output with drafts (real xgrammar matchers over a 5-token vocabulary): one mask
row per sampled position, the matcher back where it was after filling them, the runner
applying a request's consecutive rows, and the scheduler advancing the matcher over accepted
tokens only."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from tessellm.backends.reference.logits import ReferenceLogitsOps
from tessellm.core.block_manager import BlockManager
from tessellm.core.request import Request
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.scheduler import Scheduler, SchedulerConfig
from tessellm.core.step import ModelRunnerOutput
from tessellm.spec_decode.grammar import fill_draft_rows
from tessellm.structured_output.apply import apply_grammar_bitmask
from tessellm.structured_output.compiler import RequestGrammar

xgr = pytest.importorskip("xgrammar")

VOCAB = ["</s>", "a", "b", "c", "d"]
EOS, A, B = 0, 1, 2


def grammar(regex: str) -> RequestGrammar:
    info = xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS])
    future = Future()
    future.set_result(xgr.GrammarCompiler(info, max_threads=1).compile_regex(regex))
    g = RequestGrammar(future)
    assert g.ready  # the matcher exists from here
    return g


def allowed(bitmask, row: int) -> set[int]:
    word = int(bitmask[row, 0])
    return {t for t in range(len(VOCAB)) if word >> t & 1}


def test_a_row_per_position_and_the_matcher_rolled_back():
    g = grammar("abab")
    bitmask = xgr.allocate_token_bitmask(4, len(VOCAB))
    fill_draft_rows(g, [A, B, A], bitmask, 0)
    assert [allowed(bitmask, r) for r in range(4)] == [{A}, {B}, {A}, {B}]
    fill_draft_rows(g, [B, A], bitmask, 0)  # the first draft is outside the grammar
    assert [allowed(bitmask, r) for r in range(3)] == [{A}, {A}, {A}]
    assert g.accept(A) and not g.accept(A)  # still at the start: only "a" then "b"


def test_runner_applies_consecutive_rows_of_a_request():
    logits = torch.zeros(4, len(VOCAB))
    bitmask = xgr.allocate_token_bitmask(3, len(VOCAB))
    fill_draft_rows(grammar("abab"), [A, B], bitmask, 0)
    apply_grammar_bitmask(logits, ["g", "g", "g", "u"], {"g": 0}, bitmask.numpy(), ReferenceLogitsOps())
    assert logits.argmax(-1).tolist()[:3] == [A, B, A] and torch.isinf(logits[:3]).sum() == 3 * 4
    assert not torch.isinf(logits[3]).any()  # the unconstrained row untouched


def test_scheduler_verifies_drafts_of_a_constrained_request():
    s = Scheduler(SchedulerConfig(8, 64, 128), BlockManager(32, 4, True))
    g = grammar("abab")
    r = Request("g", [3, 4, 3], SamplingParams(max_tokens=8), eos_token_ids=[EOS])
    r.grammar = g
    s.add_request(r)
    out = s.schedule()
    s.update(out, ModelRunnerOutput({"g": [A]}, spec_token_ids={"g": [B, A, A]}))
    out = s.schedule()
    assert out.spec_token_ids == {"g": [B, A, A]} and out.num_sampled_tokens == {"g": 4}
    s.update(out, ModelRunnerOutput({"g": [B, A, B]}))  # two drafts accepted, then the target's "b"
    assert r.output_token_ids == [A, B, A, B] and g.is_terminated is False
    assert g.accept(EOS)  # the matcher moved over exactly the accepted tokens: "abab" is done
