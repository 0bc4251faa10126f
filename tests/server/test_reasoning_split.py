"""``ReasoningSplit`` fed one token at a time through the real incremental detokenizer (the
stream's path) and cut at every character: a think marker split across deltas never leaks into
either field, both fields only grow, and the last call equals the whole output's split."""

from __future__ import annotations

import pytest

from tessellm.core.detokenizer import IncrementalDetokenizer
from tessellm.reasoning import ANSWER, REASONING, UNDECIDED, ReasoningSplit, ThinkMarkers, get_reasoning_parser
from tests.server.thinking_model import make_thinking_model

CASES = {  # output text -> (reasoning, answer) under deepseek_r1, and undecided (deepseek_v3 in the engine core)
    "<think> Let me see. Two and two.</think> It is four.": {REASONING: (" Let me see. Two and two.", " It is four."),
                UNDECIDED: (" Let me see. Two and two.", " It is four.")},
    " I recall</think> It is four.": {REASONING: (" I recall", " It is four."), UNDECIDED: (None, " I recall</think> It is four.")},
    " Step by step Step": {REASONING: (" Step by step Step", ""), UNDECIDED: (None, " Step by step Step")},
}


@pytest.fixture(scope="module", params=["single", "split", "special"])
def tokenizer(request, tmp_path_factory):
    from transformers import AutoTokenizer

    path = make_thinking_model(str(tmp_path_factory.mktemp("tok")), split_markers=request.param == "split",
                               special_markers=request.param == "special")
    tok = AutoTokenizer.from_pretrained(path)
    tok.markers_kind = request.param
    return tok


@pytest.mark.parametrize("text", sorted(CASES))
@pytest.mark.parametrize("phase,parser", [(REASONING, "deepseek_r1"), (UNDECIDED, "deepseek_v3")])
def test_token_by_token_stream_equals_the_whole_split(tokenizer, text, phase, parser):
    markers = ThinkMarkers.from_tokenizer(get_reasoning_parser(parser), tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    # Special-token markers are kept in the text for the request (ReasoningPlan.adjust).
    assert markers.keep_special_tokens == (tokenizer.markers_kind == "special")
    detok = IncrementalDetokenizer(tokenizer, [1], skip_special_tokens=not markers.keep_special_tokens)
    split = ReasoningSplit(markers, phase)
    sent = ("", "")
    for i, token in enumerate(ids):
        detok.add_tokens([token], finished=i == len(ids) - 1)
        reasoning, answer = split.split(detok.text, ids[:i + 1], final=i == len(ids) - 1)
        reasoning = reasoning or ""
        assert reasoning.startswith(sent[0]) and answer.startswith(sent[1])  # only grows
        for piece in (reasoning[len(sent[0]):], answer[len(sent[1]):]):
            if phase == REASONING or "<think>" in detok.text[:1]:
                assert "think>" not in piece and not piece.endswith(("</", "<thi", "<"))
        sent = (reasoning, answer)
    whole = ReasoningSplit(markers, phase).split(detok.text, ids, final=True)
    expected = CASES[text][phase]
    assert whole == (expected[0] if expected[0] is not None or phase == UNDECIDED else "", expected[1])
    assert (sent[0] or None, sent[1]) == (whole[0] or None, whole[1])


def test_every_character_cut_of_a_text_marker():
    """Text mode (the marker spans tokens): at every cut of the output text, the pieces sent
    so far are prefixes of the final split and never hold a piece of a marker."""
    class Tok:  # what ThinkMarkers reads: multi-token markers, nothing special
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(i) for i in ids)

    markers = ThinkMarkers.from_tokenizer(get_reasoning_parser("deepseek_r1"), Tok())
    assert markers.end_token_ids is None and not markers.keep_special_tokens
    text = "<think>a<b</thc</think>x</think>y"
    final = ReasoningSplit(markers, REASONING).split(text, [], final=True)
    assert final == ("a<b</thc", "x</think>y")
    stream = ReasoningSplit(markers, REASONING)  # one object fed the growing text, as a stream's
    for cut in range(len(text) + 1):
        reasoning, answer = ReasoningSplit(markers, REASONING).split(text[:cut], [], final=False)
        assert stream.split(text[:cut], [], final=False) == (reasoning, answer)
        assert final[0].startswith(reasoning) and final[1].startswith(answer)
        assert not reasoning.endswith("<") and "</think>" not in reasoning


def test_prompt_decides_where_the_output_starts():
    r1, qwen3 = get_reasoning_parser("deepseek_r1"), get_reasoning_parser("qwen3")
    assert r1.initial_phase("<|Assistant|><think>\n") == REASONING
    assert qwen3.initial_phase("<|im_start|>assistant\n<think>\n\n</think>\n\n") == ANSWER
    assert qwen3.initial_phase("<think>old</think>done<|im_end|>\n<|im_start|>assistant\n") == UNDECIDED
    assert r1.initial_phase("user: hi") == REASONING


def test_unknown_parser_names_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown reasoning parser 'nope'; choose one of cohere_command3, "
                       r"cohere_command4, deepseek_r1, .*, qwen3, seed_oss, step3, step3p5 \(or register your own with "
                       r"--reasoning-parser-plugin FILE\)"):
        get_reasoning_parser("nope")
