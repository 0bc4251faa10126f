"""Structured output after reasoning (``ReasoningGate``) over real xgrammar matchers and a tiny
vocabulary: no mask while thinking, the grammar from the token after ``</think>``, exact
rollback across that boundary (speculative drafts), an undecided first token (the answer or
``<think>``: mistral's, whose output may open a block), and the step's mask rows for a
request whose drafts cross the boundary."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from tessellm.core.step import SchedulerOutput
from tessellm.reasoning.parsers import ANSWER, REASONING, UNDECIDED
from tessellm.structured_output.compiler import RequestGrammar
from tessellm.structured_output.manager import StructuredOutputManager
from tessellm.structured_output.reasoning import ReasoningGate

xgr = pytest.importorskip("xgrammar")

VOCAB = ["</s>", "a", "b", "c", "d", "<think>", "</think>", "x"]
EOS, A, B, C, D, OPEN, CLOSE, X = range(len(VOCAB))


def gate(phase, regex="ab", start=(OPEN,), end=(CLOSE,)):
    info = xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS])
    future = Future()
    future.set_result(xgr.GrammarCompiler(info, max_threads=1).compile_regex(regex))
    grammar = RequestGrammar(future)
    assert grammar.ready
    return ReasoningGate(grammar, tuple(start), tuple(end), phase)


def allowed(g) -> list[int]:
    mask = torch.zeros((1, 1), dtype=torch.int32)
    g.fill_bitmask(mask, 0)
    return [t for t in range(len(VOCAB)) if (int(mask[0, 0]) >> t) & 1]


def test_thinking_is_free_then_the_grammar_starts_after_the_end_marker():
    g = gate(REASONING)
    assert not g.constrains_next and allowed(g) == list(range(len(VOCAB)))
    for tok in (C, X, D, B, EOS + 4):  # tokens the grammar would refuse at its start
        assert g.accept(tok)
    assert not g.is_terminated and g.answer_from is None
    assert g.accept(CLOSE) and g.answer_from == 6 and g.constrains_next
    assert allowed(g) == [A]
    assert not g.accept(C)  # the answer follows the grammar
    assert g.accept(A) and g.accept(B) and g.accept(EOS) and g.is_terminated


def test_rollback_across_the_end_marker_is_exact():
    g = gate(REASONING)
    for tok in (C, CLOSE, A):
        assert g.accept(tok)
    g.rollback(2)  # back to "c": thinking again, the grammar at its start
    assert g.answer_from is None and g.tokens == [C] and allowed(g) == list(range(len(VOCAB)))
    assert g.accept(D) and g.accept(CLOSE)
    assert allowed(g) == [A]  # the matcher had been rolled back over "a"
    assert g.accept(A) and allowed(g) == [B]
    g.rollback(1)
    assert g.answer_from == 3 and allowed(g) == [A]


def test_undecided_output_answers_or_opens_a_think_block():
    g = gate(UNDECIDED)
    assert g.constrains_next and allowed(g) == [A, OPEN]  # the grammar's first token, or <think>
    assert g.accept(A) and g.answer_from == 0 and allowed(g) == [B]
    g.rollback(1)
    assert g.answer_from is None and allowed(g) == [A, OPEN]
    assert g.accept(OPEN) and not g.constrains_next  # thinking
    assert g.accept(C) and g.accept(CLOSE) and allowed(g) == [A]


def test_multi_token_start_marker_is_held_to_its_next_token():
    g = gate(UNDECIDED, start=(C, D), end=(X, X))  # markers spelled with two tokens each
    assert allowed(g) == [A, C]
    assert g.accept(C) and allowed(g) == [D] and not g.accept(B)
    assert g.accept(D) and not g.constrains_next
    assert g.accept(X) and g.answer_from is None and g.accept(X) and g.answer_from == 4
    assert allowed(g) == [A]


def test_prompt_that_closed_the_block_constrains_from_the_first_token():
    g = gate(ANSWER)
    assert allowed(g) == [A] and not g.accept(OPEN)


def test_step_mask_rows_for_drafts_that_cross_the_end_marker():
    """A thinking request gets no row while sampling one token; verifying drafts c </think> a
    it gets four: free, free, the grammar's start, the grammar after "a"."""
    manager = StructuredOutputManager(lambda: None, len(VOCAB), [EOS])
    thinking = gate(REASONING)
    drafting = gate(REASONING)

    class Req:
        def __init__(self, grammar):
            self.grammar = grammar

    sched = SchedulerOutput([], [], {"t": 1, "d": 4}, 5, num_sampled_tokens={"t": 1, "d": 4},
                            spec_token_ids={"d": [C, CLOSE, A]})
    manager.fill_bitmask(sched, {"t": Req(thinking), "d": Req(drafting)})
    assert sched.grammar_bitmask_rows == {"d": 0}
    rows = [[t for t in range(len(VOCAB)) if (int(sched.grammar_bitmask[r, 0]) >> t) & 1] for r in range(4)]
    assert rows == [list(range(len(VOCAB))), list(range(len(VOCAB))), [A], [B]]
    assert drafting.tokens == [] and drafting.answer_from is None  # the drafts were rolled back


def test_any_spelling_of_the_end_starts_the_grammar():
    """granite's "Here's my response:" as well as "Here is ...", Kimi K2's tool-call section as
    well as </think>: each ends the thinking for the grammar as for the split."""
    for end in ((X, D), (C,), (CLOSE,)):
        g = gate(REASONING)
        g = ReasoningGate(g.inner, (OPEN,), (CLOSE,), REASONING, ((X, D), (C,)))
        for token in (A, *end):
            assert not g.constrains_next and g.accept(token)
        assert g.answer_from == 1 + len(end) and allowed(g) == [A]
        assert g.accept(A) and allowed(g) == [B]


class _MarkerTokenizer:
    """This vocabulary with a parser's markers as its tokens: start <think>, end </think>, a
    kept end (a tool-call opener) x."""

    def __init__(self, parser):
        self.ids = {parser.start: OPEN, parser.end: CLOSE, **{kept: X for kept in parser.end_kept}}

    def encode(self, text, add_special_tokens=False):
        return [self.ids[text]]

    def decode(self, ids, skip_special_tokens=False):
        names = {i: text for text, i in self.ids.items()}
        return "".join("" if skip_special_tokens else names[i] for i in ids)


@pytest.mark.parametrize("name,prompt_tail,template_kwargs,tokens,answer_from", [
    ("gemma4", "<|turn>model\n", None, (OPEN, C, CLOSE), 3),  # thinks: <|channel> ... <channel|>
    ("gemma4", "<|turn>model\n", None, (OPEN, C, X), 3),  # a tool call ends the thinking
    ("gemma4", "<|turn>model\n", None, (), 0),  # answers at once
    ("deepseek_v4", "<｜Assistant｜>", {}, (C, CLOSE), 2),  # thinking on by default
    ("deepseek_v4", "<｜Assistant｜>", {"thinking": False}, (), 0),
    ("hy_v3", "<|hy_Assistant|>", {}, (), 0),  # no reasoning_effort: no_think
    ("hy_v3", "<|hy_Assistant|>", {"reasoning_effort": "high"}, (C, CLOSE), 2),
    ("ling3", "<role>ASSISTANT</role>", {}, (C, X), 2),
    ("nemotron_v3", "<|im_start|>assistant\n", {"enable_thinking": False}, (), 0),
    ("nemotron_v3", "<|im_start|>assistant\n", {}, (C, CLOSE), 2),
    ("minimax_m3", "]~b]ai\n", None, (OPEN, C, CLOSE), 3),
])
def test_the_grammar_starts_where_each_added_parser_ends_the_thinking(name, prompt_tail, template_kwargs,
                                                                      tokens, answer_from):
    """The phase the server sends (``reasoning_phase``: the prompt and the request's switch),
    then the parser's end markers as the gate's token ids: the grammar ("ab") from the token
    after the thinking."""
    from tessellm.reasoning.parsers import ThinkMarkers, get_reasoning_parser

    parser = get_reasoning_parser(name)
    markers = ThinkMarkers.from_tokenizer(parser, _MarkerTokenizer(parser))
    phase = parser.initial_phase(prompt_tail, parser.thinking(template_kwargs))
    g = gate(phase, start=markers.start_ids, end=markers.end_ids)
    g = ReasoningGate(g.inner, markers.start_ids, markers.end_ids, phase, markers.other_end_ids)
    for token in tokens:
        assert g.answer_from is None and g.accept(token)
    assert A in allowed(g) and g.accept(A) and g.answer_from == answer_from and allowed(g) == [B]
