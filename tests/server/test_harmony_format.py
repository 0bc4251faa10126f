"""gpt-oss's harmony format (``tessellm/reasoning/harmony.py``) against OpenAI's own
``openai-harmony`` as the oracle: completions rendered by it (every mix of analysis, commentary
preambles, function calls, built-in tool calls and final answers; text with ``<``, ``|`` and
non-ASCII) parse to the messages its parser reads from the same tokens, whole and after every
token of a stream (the open message's content equal to its ``StreamableParser``'s); the OpenAI
view of a stream (reasoning, content, tool-call pieces) reassembles to the whole response's;
malformed and truncated outputs never raise and only grow while streaming.

openai-harmony loads the o200k_base vocabulary from ``TIKTOKEN_ENCODINGS_BASE`` (a folder
holding ``o200k_base.tiktoken``) or its download cache; without either these cases skip (the
fuzz and hand-written cases run without it).
"""

from __future__ import annotations

import random

import pytest

from tessellm.entrypoints.openai.tool_parsers import HarmonyToolParser
from tessellm.entrypoints.openai.tools import ToolCallView
from tessellm.reasoning.harmony import HarmonyParser, join, parse_header, to_openai

CALL_ARGS = '{"city": "Paris", "unit": "c"}'


@pytest.fixture(scope="module")
def enc():
    harmony = pytest.importorskip("openai_harmony")
    try:
        return harmony.load_harmony_encoding(harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    except harmony.HarmonyError as exc:  # no vocabulary here (no network at test time)
        pytest.skip(f"openai-harmony has no o200k_base vocabulary: {exc}")


def _msg(channel, text, recipient=None, content_type=None):
    from openai_harmony import Message, Role

    m = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    if recipient:
        m = m.with_recipient(recipient)
    if content_type:
        m = m.with_content_type(content_type)
    return m


def _call(name="get_weather", args=CALL_ARGS):
    return _msg("commentary", args, f"functions.{name}", "<|constrain|>json")


CASES = {
    "analysis_final": lambda: [_msg("analysis", "The user wants 2+2. That is 4."), _msg("final", "It is 4.")],
    "final_only": lambda: [_msg("final", "Hello there!")],
    "analysis_call": lambda: [_msg("analysis", "Need the weather."), _call()],
    "call_only": lambda: [_call()],
    "preamble_call": lambda: [_msg("analysis", "Plan."), _msg("commentary", "Let me check."), _call()],
    "two_calls": lambda: [_call("a", '{"x": 1}'), _call("b", '{"y": [1, 2]}')],
    "builtin_tool": lambda: [_msg("analysis", "Search."), _msg("analysis", '{"q": "x"}', "browser.search")],
    "tricky_text": lambda: [_msg("analysis", "a<b | c <| d |> é 日本"), _msg("final", "x < y | z; ünï <|")],
    "empty_final": lambda: [_msg("analysis", "thinking"), _msg("final", "")],
    "analysis_truncated": lambda: [_msg("analysis", "I was cut off mid")],
}
TURN_END = {"final": "<|return|>", "commentary": "<|call|>"}


def _completion(enc, messages, keep_stop: bool, truncate: bool = False) -> list[int]:
    """The tokens gpt-oss would generate after ``<|start|>assistant``: each message rendered,
    the last one ending the turn (``<|call|>`` / ``<|return|>``, or cut off: ``truncate``);
    ``keep_stop`` False: the stop token not in the output (as the engine stops on it)."""
    tokens = [t for m in messages for t in enc.render(m)][2:]  # the prompt has <|start|>assistant
    end = enc.encode("<|end|>", allowed_special="all")[0]
    last = messages[-1]
    if truncate:
        return tokens[:-1]
    if tokens[-1] == end and last.channel in TURN_END and (last.channel == "final" or last.recipient):
        tokens[-1] = enc.encode(TURN_END[last.channel], allowed_special="all")[0]
    return tokens if keep_stop else tokens[:-1]


def _decode(enc, tokens) -> str:
    """As the detokenizer: special tokens kept, an incomplete UTF-8 character held back."""
    for end in range(len(tokens), -1, -1):
        try:
            return enc.decode_utf8(tokens[:end])
        except Exception:  # noqa: BLE001 - a character split across tokens: hold its first part
            continue


def _ours(messages):
    return [(m.channel, m.recipient, m.content_type, m.content) for m in messages]


def _oracle(parsed):
    return [(m.channel, m.recipient, (m.content_type or "").replace("<|constrain|>", "") or None,
             "".join(c.text for c in m.content)) for m in parsed]


@pytest.mark.parametrize("keep_stop", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_whole_output_matches_openai_harmony(enc, case, keep_stop):
    from openai_harmony import Role

    truncated = case == "analysis_truncated"
    tokens = _completion(enc, CASES[case](), keep_stop, truncate=truncated)
    sp = _streamable(enc, tokens)
    if not truncated:
        sp.process_eos()
    expected = _oracle(sp.messages) + ([("analysis", None, None, sp.current_content)] if truncated else [])
    if not truncated:
        assert expected == _oracle(enc.parse_messages_from_completion_tokens(tokens, role=Role.ASSISTANT))
    assert _ours(HarmonyParser().parse(_decode(enc, tokens), final=True)) == expected


def _streamable(enc, tokens):
    from openai_harmony import Role, StreamableParser

    sp = StreamableParser(enc, role=Role.ASSISTANT)
    for t in tokens:
        sp.process(t)
    return sp


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_token_boundary_matches_streamable_parser(enc, case):
    """After each token: the complete messages are the oracle's, the open one's content is its
    current content (less at most a held-back ``<`` piece), and the whole text only grows."""
    from openai_harmony import Role, StreamableParser

    tokens = _completion(enc, CASES[case](), keep_stop=True, truncate=case == "analysis_truncated")
    ours, sp = HarmonyParser(), StreamableParser(enc, role=Role.ASSISTANT)
    previous = []
    for k, t in enumerate(tokens, 1):
        sp.process(t)
        got = ours.parse(_decode(enc, tokens[:k]), final=False)
        done = [m for m in got if m.done]
        assert _ours(done) == _oracle(sp.messages), k
        open_ = [m for m in got if not m.done]
        if open_:
            assert len(open_) == 1 and open_[0].channel == sp.current_channel, k
            assert sp.current_content.startswith(open_[0].content), k
            assert len(sp.current_content) - len(open_[0].content) <= 2, k  # "<" or "<|" held back
        for before, after in zip(previous, got):
            assert after.content.startswith(before.content), k
        previous = got


def _stream_view(text_steps, calls=True):
    view = ToolCallView(HarmonyToolParser(calls=calls))
    reasoning, content, args, names = "", "", {}, {}
    for i, text in enumerate(text_steps):
        new_content, pieces = view.delta(text, final=i == len(text_steps) - 1)
        content += new_content
        r = view.parser.reasoning or ""
        assert r.startswith(reasoning)
        reasoning = r
        for p in pieces:
            if p.function.name:
                names[p.index] = p.function.name
            args[p.index] = args.get(p.index, "") + (p.function.arguments or "")
    return reasoning, content, [(names[i], args[i]) for i in sorted(names)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_stream_reassembles_to_the_whole_response(enc, case):
    tokens = _completion(enc, CASES[case](), keep_stop=False, truncate=case == "analysis_truncated")
    text = _decode(enc, tokens)
    whole = ToolCallView(HarmonyToolParser())
    content, calls = whole.final(text)
    steps = [_decode(enc, tokens[:k]) for k in range(1, len(tokens) + 1)]
    reasoning, streamed, streamed_calls = _stream_view(steps)
    assert reasoning == (whole.parser.reasoning or "")
    assert streamed == (content or "")
    assert streamed_calls == [(c.function.name, c.function.arguments) for c in calls]


def test_openai_view_of_a_call():
    text = ('<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary '
            f'to=functions.get_weather <|constrain|>json<|message|>{CALL_ARGS}')
    out = to_openai(HarmonyParser().parse(text, final=True))
    assert out.reasoning == ["Need the weather."] and out.content == []
    assert out.calls == [("get_weather", CALL_ARGS)]
    off = to_openai(HarmonyParser().parse(text, final=True), calls=False)  # tool_choice none
    assert off.calls == [] and off.reasoning == ["Need the weather.", CALL_ARGS]


def test_recipient_before_channel_and_role_after_start():
    text = '<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.f<|channel|>commentary json<|message|>{}'
    assert _ours(HarmonyParser().parse(text, final=True)) == [
        ("analysis", None, None, "x"), ("commentary", "functions.f", "json", "{}")]
    assert parse_header("<|channel|>commentary to=functions.g <|constrain|>json") == ("commentary", "functions.g", "json")


@pytest.mark.parametrize("text, expected", [
    ("Plain text, no format at all.", [(None, None, None, "Plain text, no format at all.")]),
    ("<|channel|>final<|message|>cut", [("final", None, None, "cut")]),
    ("<|channel|>analysis", []),  # a header that never reached <|message|>
    ("<|channel|>final<|message|>a<|start|>assistant<|channel|>final<|message|>b",  # no <|end|>
     [("final", None, None, "a"), ("final", None, None, "b")]),
    ("<|channel|>" + "x" * 300 + "<|message|>y", [(None, None, None, "<|channel|>" + "x" * 300 + "<|message|>y")]),
    ("<|channel|>analysis<|end|>rest", [(None, None, None, "<|channel|>analysis"), (None, None, None, "rest")]),
    ("<|start|><|start|><|end|><|return|>",  # each <|start|> opens no header: text
     [(None, None, None, "<|start|>"), (None, None, None, "<|start|>"), (None, None, None, "")]),
    ("", []),
])
def test_malformed_outputs(text, expected):
    assert _ours(HarmonyParser().parse(text, final=True)) == expected


def test_join_skips_empty_messages():
    assert join(["a", "", "b"]) == "a\nb"


PIECES = ["<|start|>", "assistant", "<|channel|>", "analysis", "final", "commentary", "<|message|>", "<|end|>",
          "<|call|>", "<|return|>", "<|constrain|>", "json", " to=functions.f", " to=", "<", "|", "<|", "x", " ",
          "{", "}", '"a"', ":", "\n", "é"]


def test_fuzz_never_raises_and_only_grows():
    """Random sequences of marker and text pieces, streamed piece by piece then finished: no
    exception, content and calls' arguments only grow, and the finished stream equals the whole
    response (the streaming hold-back releases everything at the end)."""
    rng = random.Random(0)
    for _ in range(400):
        pieces = [rng.choice(PIECES) for _ in range(rng.randint(0, 30))]
        steps = ["".join(pieces[:k]) for k in range(1, len(pieces) + 1)] or [""]
        reasoning, content, calls = _stream_view(steps)
        whole = ToolCallView(HarmonyToolParser())
        whole_content, whole_calls = whole.final(steps[-1])
        assert content == (whole_content or "")
        assert reasoning == (whole.parser.reasoning or "")
        assert calls == [(c.function.name, c.function.arguments) for c in whole_calls]


def test_text_replaced_midway_starts_over():
    parser = HarmonyParser()
    parser.parse("<|channel|>final<|message|>long answer text here", final=False)
    assert _ours(parser.parse("<|channel|>final<|message|>ab", final=True)) == [("final", None, None, "ab")]


def test_gpt_oss_checkpoints_select_harmony():
    from transformers import GptOssConfig, LlamaConfig

    from tessellm.reasoning.parsers import get_reasoning_parser, resolve_reasoning_parser

    assert resolve_reasoning_parser(None, GptOssConfig()) == "openai_gptoss"
    assert resolve_reasoning_parser(None, LlamaConfig()) is None
    assert resolve_reasoning_parser("qwen3", GptOssConfig()) == "qwen3"  # the flag wins
    assert get_reasoning_parser("openai_gptoss").harmony


def test_forced_tool_choice_reads_the_final_channel_only():
    """With tool_choice required, a commentary preamble stays content and the final channel's
    JSON array is the call (joined with the preamble it would not parse)."""
    from tessellm.entrypoints.openai.tool_parsers import RequiredParser

    text = ('<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>final<|message|>'
            '[{"name": "get_weather", "parameters": {"city": "Paris"}}]')
    view = ToolCallView(HarmonyToolParser(forced=RequiredParser()))
    content, calls = view.final(text)
    assert content == "Checking." and [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_weather", '{"city": "Paris"}')]


def test_grammar_gate_markers_are_the_headers_gpt_oss_writes(enc):
    """The engine core starts a constrained request's grammar after the openai_gptoss parser's
    end marker, matched on its token ids: those must be the final channel's header exactly as
    the model writes it (and the start marker the analysis channel's)."""
    from tessellm.reasoning.parsers import get_reasoning_parser

    parser = get_reasoning_parser("openai_gptoss")
    for channel, marker in (("final", parser.end), ("analysis", parser.start)):
        rendered = enc.render(_msg(channel, "x"))  # <|start|> assistant <|channel|> NAME <|message|> x <|end|>
        assert enc.encode(marker, allowed_special="all") == rendered[2:5]


def test_a_prompt_that_opens_the_first_header():
    from tessellm.reasoning.harmony import prompt_header

    assert prompt_header("<|start|>user<|message|>hi<|end|><|start|>assistant") is None
    assert prompt_header("<|end|><|start|>assistant<|channel|>final<|message|>") == ("final", None, None)
    assert prompt_header("<|start|>assistant<|channel|>final<|message|>Hi<|end|>") is None
    opened = prompt_header("<|start|>assistant<|channel|>analysis<|message|>")
    text = "Thinking.<|end|><|start|>assistant<|channel|>final<|message|>Done."
    steps = [text[:k] for k in range(1, len(text) + 1)]
    view = ToolCallView(HarmonyToolParser(opened=opened))
    streamed = "".join(view.delta(step, final=k == len(steps) - 1)[0] for k, step in enumerate(steps))
    assert (view.parser.reasoning, streamed) == ("Thinking.", "Done.")
