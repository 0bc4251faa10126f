"""The ``qwen3`` (and ``mimo``) reasoning parser as vLLM's current one reads Qwen3's outputs:
thinking from the first token unless ``enable_thinking`` is false (the Thinking-2507 and
Qwen3.5 templates put ``<think>\\n`` in the prompt, older ones let the model write it), and
``<tool_call>`` ending the thinking as ``</think>`` does. Each case goes the server's way
(the rendered prompt's end and the request's switch give the phase) and is split whole and
streamed in random chunkings of its tokens, which must agree; the engine core's grammar gate,
given the same phase, starts the answer at the same token."""

from __future__ import annotations

import random
import re

import pytest

from tessellm.reasoning import ANSWER, REASONING, UNDECIDED, ReasoningSplit, ThinkMarkers, get_reasoning_parser
from tessellm.structured_output.reasoning import ReasoningGate

SPECIAL = ("<think>", "</think>", "<tool_call>", "</tool_call>")  # one token each, as in Qwen3's vocabulary


class QwenLikeTokenizer:
    """Qwen3's markers one token each (ids 1-4), every other character its own token."""

    def encode(self, text, add_special_tokens=False):
        pieces = re.split("(" + "|".join(map(re.escape, SPECIAL)) + ")", text)
        return [i for p in pieces if p for i in ([SPECIAL.index(p) + 1] if p in SPECIAL else map(ord, p))]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(SPECIAL[i - 1] if i <= len(SPECIAL) else chr(i) for i in ids)


THINKING_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"  # Thinking-2507, Qwen3.5
HYBRID_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # Qwen3: the model writes <think>
OFF_PROMPT = HYBRID_PROMPT + "<think>\n\n</think>\n\n"  # enable_thinking false, as the template renders it
OFF = {"enable_thinking": False}
CALL = '<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>'

CASES = [  # prompt's end, chat_template_kwargs, output, (reasoning, content)
    (THINKING_PROMPT, None, "Add them.\n</think>\n\nIt is 4.", ("Add them.\n", "\n\nIt is 4.")),
    (HYBRID_PROMPT, None, "<think>\nAdd them.\n</think>\n\nIt is 4.", ("\nAdd them.\n", "\n\nIt is 4.")),
    (HYBRID_PROMPT, {"enable_thinking": True}, "Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    (THINKING_PROMPT, None, "Still adding <tool_", ("Still adding <tool_", "")),  # cut off: all thinking
    (HYBRID_PROMPT, None, "It is 4.", ("It is 4.", "")),  # no </think>: thinking, as vLLM's
    # the switch off: all answer, whatever the output holds (the template may ignore the switch)
    (HYBRID_PROMPT, OFF, "It is 4.", (None, "It is 4.")),
    (THINKING_PROMPT, OFF, "Add them.</think>It is 4.", (None, "Add them.</think>It is 4.")),
    (OFF_PROMPT, None, "It is 4.", (None, "It is 4.")),  # the prompt closed the block: the same
    # <tool_call> ends the thinking and stays in the answer for the tool parser
    (THINKING_PROMPT, None, "I should check.\n" + CALL, ("I should check.\n", CALL)),
    (HYBRID_PROMPT, None, "<think>\nCheck.\n" + CALL, ("\nCheck.\n", CALL)),
    (THINKING_PROMPT, None, "Check.</think>\n\n" + CALL, ("Check.", "\n\n" + CALL)),
    (OFF_PROMPT, None, CALL, (None, CALL)),
]


def _streamed(markers, phase, ids, tokenizer, rng) -> tuple:
    """The split fed the output in random chunks of tokens: each piece only grows."""
    split, sent, cut = ReasoningSplit(markers, phase), ("", ""), 0
    while cut < len(ids):
        cut = min(len(ids), cut + rng.randint(1, 4))
        reasoning, answer = split.split(tokenizer.decode(ids[:cut]), ids[:cut], final=cut == len(ids))
        assert (reasoning or "").startswith(sent[0]) and answer.startswith(sent[1]), cut
        sent = (reasoning or "", answer)
    return reasoning, answer


class _AnyGrammar:
    """Accepts every token (the gate's inner grammar; only where the answer starts matters)."""

    def accept(self, token):
        return True


@pytest.mark.parametrize("name", ["qwen3", "mimo"])
@pytest.mark.parametrize("prompt,kwargs,text,expected", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_whole_streamed_and_gated_agree(name, prompt, kwargs, text, expected):
    parser, tokenizer = get_reasoning_parser(name), QwenLikeTokenizer()
    markers = ThinkMarkers.from_tokenizer(parser, tokenizer)
    phase = markers.initial_phase(tokenizer, tokenizer.encode(prompt), parser.thinking(kwargs))
    ids = tokenizer.encode(text)
    assert ReasoningSplit(markers, phase).split(text, ids, final=True) == expected
    rng = random.Random(len(text))
    for _ in range(5):
        assert _streamed(markers, phase, ids, tokenizer, rng) == expected
    gate = ReasoningGate(_AnyGrammar(), markers.start_ids, markers.end_ids, phase, markers.other_end_ids)
    for token in ids:
        assert gate.accept(token)
    reasoning, content = expected
    if reasoning is None:
        assert gate.answer_from == 0
    elif not content:
        assert gate.answer_from is None  # still thinking: the grammar has not started
    else:  # the grammar starts after the end marker (after <tool_call>, which opens the answer)
        assert content.endswith(tokenizer.decode(ids[gate.answer_from:]))
        assert tokenizer.decode(ids[:gate.answer_from]).endswith(("</think>", "<tool_call>"))


def test_the_markers_end_the_thinking_only_as_their_tokens():
    """``</think>`` or ``<tool_call>`` spelled from other tokens is text, as for the grammar
    gate: the thinking ends at the first end token among the ids, whole and streamed."""
    tokenizer = QwenLikeTokenizer()
    markers = ThinkMarkers.from_tokenizer(get_reasoning_parser("qwen3"), tokenizer)
    assert markers.end_token_ids == {2: "</think>", 3: "<tool_call>"}
    for text in ("Add.</think>4", "Add." + CALL):
        as_text = [ord(c) for c in text]
        assert ReasoningSplit(markers, REASONING).split(text, as_text, final=True) == (text, "")
        assert ReasoningSplit(markers, REASONING).split(text, tokenizer.encode(text), final=True)[0] == "Add."
    spelled = "Use <tool_call> tags."  # written in pieces while thinking, then the real markers
    text = spelled + "</think>" + CALL
    ids = [ord(c) for c in spelled] + tokenizer.encode("</think>" + CALL)
    expected = (spelled, CALL)
    assert ReasoningSplit(markers, REASONING).split(text, ids, final=True) == expected
    stream = ReasoningSplit(markers, REASONING)
    for cut in range(1, len(ids) + 1):
        got = stream.split(tokenizer.decode(ids[:cut]), ids[:cut], final=cut == len(ids))
        assert expected[0].startswith(got[0]) and expected[1].startswith(got[1]), cut
    assert got == expected


@pytest.mark.parametrize("marker", ["</think>", "<tool_call>"])
def test_a_marker_written_in_pieces_before_the_same_end_token_is_text(marker):
    """The model spells the end marker from other tokens while thinking, then writes its token:
    the thinking ends at the token (as the grammar gate's), not at the first copy in the text."""
    tokenizer = QwenLikeTokenizer()
    markers = ThinkMarkers.from_tokenizer(get_reasoning_parser("qwen3"), tokenizer)
    spelled = f"Write {marker} there."
    after = "4" if marker == "</think>" else CALL[len(marker):]
    text = spelled + marker + after
    ids = [ord(c) for c in spelled] + tokenizer.encode(marker + after)
    expected = (spelled, after if marker == "</think>" else CALL)
    assert ReasoningSplit(markers, REASONING).split(text, ids, final=True) == expected
    for seed in range(4):
        assert _streamed(markers, REASONING, ids, tokenizer, random.Random(seed)) == expected
    gate = ReasoningGate(_AnyGrammar(), markers.start_ids, markers.end_ids, REASONING, markers.other_end_ids)
    for token in ids:
        gate.accept(token)
    assert tokenizer.decode(ids[:gate.answer_from]) == spelled + marker  # the grammar starts after it


def test_an_output_that_ended_in_its_thinking_has_no_content_with_tools_too():
    """vLLM's: content None when the output ended with its reasoning; with tools (auto or
    required) it was "" (the tool parser's empty text)."""
    from tessellm.entrypoints.openai.protocol import ChatCompletionRequest
    from tessellm.entrypoints.openai.reasoning import ReasoningPlan
    from tessellm.entrypoints.openai.serving_chat import _ChatView
    from tessellm.entrypoints.openai.tools import ToolPlan

    tokenizer = QwenLikeTokenizer()
    tools = [{"type": "function", "function": {"name": "f"}}]
    for choice, parser in (("auto", "hermes"), ("required", None), (None, None)):
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **(
            {"tools": tools, "tool_choice": choice} if choice else {}))
        plan = ToolPlan(req, parser) if choice else None
        reasoning = ReasoningPlan("qwen3", tokenizer, tokenizer.encode(THINKING_PROMPT), True)
        view = _ChatView(None, req, "m", "id", plan, reasoning)
        message, reason = view.message("Still adding", "length", tokenizer.encode("Still adding"))
        assert (message.reasoning, message.content, message.tool_calls or None, reason) == (
            "Still adding", None, None, "length"), choice


def test_where_the_output_starts():
    """The server knows the switch (on by default); the engine core, offline, sees the prompt
    alone: a prompt that names no marker leaves it to the output (``<think>`` first, or the
    grammar's first token)."""
    qwen3 = get_reasoning_parser("qwen3")
    assert qwen3.thinking(None) is True and qwen3.thinking(OFF) is False
    assert qwen3.thinking({"enable_thinking": None}) is False  # vLLM's: falsy turns it off
    assert qwen3.initial_phase(THINKING_PROMPT, True) == REASONING
    assert qwen3.initial_phase(HYBRID_PROMPT, True) == REASONING
    assert qwen3.initial_phase(THINKING_PROMPT, False) == ANSWER
    assert qwen3.initial_phase(THINKING_PROMPT) == REASONING  # the engine core: the template opened it
    assert qwen3.initial_phase(OFF_PROMPT) == ANSWER
    assert qwen3.initial_phase(HYBRID_PROMPT) == UNDECIDED
    # a tool-call loop: an earlier turn's call (and the tool prompt's example) decide nothing
    loop = (HYBRID_PROMPT + "<think>\nCheck.\n</think>\n\n" + CALL + "<|im_end|>\n<|im_start|>user\n"
            "<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert qwen3.initial_phase(loop, True) == REASONING and qwen3.initial_phase(loop) == UNDECIDED
    assert qwen3.initial_phase(loop + "<think>\n") == REASONING
