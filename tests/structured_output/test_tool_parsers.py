"""Tool-call parsers on recorded model outputs: whole, streamed prefix by prefix, adversarial."""

from __future__ import annotations

import json
import random
import time

import pytest

from tessellm.entrypoints.openai.tool_parsers import (HermesParser, Llama3JsonParser, MistralParser,
                                                      NamedParser, RequiredParser, get_tool_parser)
from tessellm.entrypoints.openai.tools import ToolCallView

WEATHER = {"city": "Paris", "unit": "celsius"}

# (parser, recorded output, expected content, expected [(name, arguments dict)])
RECORDED = [
    (HermesParser, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                   '"unit": "celsius"}}\n</tool_call>', "Let me check.\n", [("get_weather", WEATHER)]),
    (HermesParser, '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n'
                   '{"name": "b", "arguments": {"y": [1, 2]}}\n</tool_call>', "", [("a", {"x": 1}), ("b", {"y": [1, 2]})]),
    # Qwen sometimes stops (EOS) before the closing tag
    (HermesParser, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
     "", [("get_weather", WEATHER)]),
    (HermesParser, "The weather is sunny <tool_call are nice>.", "The weather is sunny <tool_call are nice>.", []),
    (Llama3JsonParser, '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "",
     [("get_weather", WEATHER)]),
    (Llama3JsonParser, '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}', "",
     [("a", {"x": 1}), ("b", {})]),
    (Llama3JsonParser, "Paris is sunny today.", "Paris is sunny today.", []),
    (MistralParser, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', "",
     [("get_weather", WEATHER)]),
    (MistralParser, 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]a[ARGS]{}',
     "Sure. ", [("get_weather", WEATHER), ("a", {})]),
    (RequiredParser, '[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}, '
                     '{"name": "a", "parameters": {"x": 1}}]', "", [("get_weather", WEATHER), ("a", {"x": 1})]),
]


def _calls(calls):
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


@pytest.mark.parametrize("parser_cls,text,content,calls", RECORDED)
def test_whole_output(parser_cls, text, content, calls):
    got_content, got_calls = ToolCallView(parser_cls()).final(text)
    assert _calls(got_calls) == calls
    assert (got_content or "") == content
    ids = [c.id for c in got_calls]
    assert len(set(ids)) == len(ids)
    if parser_cls is MistralParser:
        assert all(len(i) == 9 and i.isalnum() for i in ids)
    else:
        assert all(i.startswith("call_") for i in ids)


def _stream(parser, text: str, step):
    """Feed growing prefixes (``step``: a chunk size, or the positions to cut the text at);
    reassemble content and tool calls from the deltas, as a client does."""
    view = ToolCallView(parser)
    content, calls = "", {}
    cuts = list(range(step, len(text), step)) if isinstance(step, int) else sorted(set(step) - {0, len(text)})
    cuts.append(len(text))
    for n in cuts:
        delta, pieces = view.delta(text[:n], final=n == len(text))
        content += delta
        for p in pieces:
            if p.id is not None:
                assert p.index not in calls and p.function.name
                calls[p.index] = {"id": p.id, "name": p.function.name, "arguments": ""}
            calls[p.index]["arguments"] += p.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)]


def check_whole(name: str, text: str, content: str, calls) -> None:
    """Parser ``name`` on the whole ``text``: ``content`` and ``calls`` ((name, arguments))."""
    got_content, got_calls = ToolCallView(get_tool_parser(name)).final(text)
    assert _calls(got_calls) == calls
    assert (got_content or "") == content


def check_stream(name: str, text: str, content: str, calls, step) -> None:
    """Parser ``name`` on ``text`` streamed (``step``: as ``_stream`` takes it) reassembles
    to ``content`` and ``calls``."""
    got_content, got_calls = _stream(get_tool_parser(name), text, step)
    assert (got_content, [(c["name"], json.loads(c["arguments"])) for c in got_calls]) == (content, calls), \
        (name, text, step)


def check_random_chunkings(recorded, seed: int) -> None:
    """Every ``(name, text, content, calls)`` of ``recorded`` cut at random places (a token may
    end anywhere, mid-marker included): the deltas reassemble to the whole-text parse."""
    rng = random.Random(seed)
    for name, text, content, calls in recorded:
        cuts = rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))
        check_stream(name, text, content, calls, sorted(cuts))


@pytest.mark.parametrize("step", [1, 3, 17])
@pytest.mark.parametrize("parser_cls,text,content,calls", RECORDED)
def test_partial_streams_reassemble(parser_cls, text, content, calls, step):
    got_content, got_calls = _stream(parser_cls(), text, step)
    assert got_content == content
    assert [(c["name"], json.loads(c["arguments"])) for c in got_calls] == calls


def test_stream_holds_back_a_marker_start():
    view = ToolCallView(HermesParser())
    assert view.delta("Hello <tool", final=False)[0] == "Hello "
    content, pieces = view.delta('Hello <tool_call>{"name": "f", "argu', final=False)
    assert content == "" and pieces[0].function.name == "f" and pieces[0].function.arguments == ""


def test_named_streams_arguments_as_they_grow():
    text = '{"city": "Paris"}'
    content, calls = _stream(NamedParser("get_weather"), text, 4)
    assert content == "" and calls[0]["name"] == "get_weather" and calls[0]["arguments"] == text


@pytest.mark.parametrize("text", ["", " ", "\n\n", "<tool_call>", "<tool_call>\n "])
def test_named_with_no_arguments_calls_nothing(text):
    """An output that ended while still thinking (its answer empty, or a marker that opened
    it and nothing after) calls nothing: vLLM's parser returns no call (it returned one with
    "" arguments before), whole and streamed."""
    parser = NamedParser("get_weather")
    parser.opened = ("<tool_call>",)
    assert ToolCallView(parser).final(text) == ("", [])
    for step in (1, 2):
        assert _stream(NamedParser("get_weather"), text.removeprefix("<tool_call>"), step) == ("", [])
    text += ' {"city": "Paris"}'  # the call, once its arguments start
    _, calls = ToolCallView(parser).final(text)
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", parser.forced_text(text))]
    rng = random.Random(len(text))
    for _ in range(4):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 6)))
        streamer = NamedParser("get_weather")
        streamer.opened = ("<tool_call>",)
        content, streamed = _stream(streamer, text, cuts)
        assert content == "" and [(c["name"], c["arguments"]) for c in streamed] == [
            ("get_weather", parser.forced_text(text))]


@pytest.mark.parametrize("text", ["", " ", "\n\n"])
def test_named_whole_response_with_no_arguments_has_no_content(text):
    """The chat response's message for a named tool_choice whose answer is only whitespace: no
    call and content null (vLLM clears a named call's content; it was "", the parser's text)."""
    from tessellm.entrypoints.openai.protocol import ChatCompletionRequest
    from tessellm.entrypoints.openai.serving_chat import _ChatView
    from tessellm.entrypoints.openai.tools import ToolPlan

    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                tools=[{"type": "function", "function": {"name": "get_weather"}}],
                                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    view = _ChatView(None, req, "m", "id", ToolPlan(req, None))
    message, reason = view.message(text, "stop")
    assert (message.content, message.tool_calls or None, reason) == (None, None, "stop")
    message, reason = view.message(' {"city": "Paris"}', "stop")
    assert message.content is None and [c.function.name for c in message.tool_calls] == ["get_weather"]


def test_invalid_call_falls_back_to_content():
    text = "<tool_call>{not json}</tool_call>"
    content, calls = ToolCallView(HermesParser()).final(text)
    assert content == text and calls == []


def test_auto_without_parser_names_every_parser():
    """tool_choice 'auto' on a server without --tool-call-parser: a 400 listing every choice."""
    from tessellm.entrypoints.openai.errors import OpenAIError
    from tessellm.entrypoints.openai.protocol import ChatCompletionRequest
    from tessellm.entrypoints.openai.tool_parsers import TOOL_PARSERS
    from tessellm.entrypoints.openai.tools import ToolPlan

    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(OpenAIError) as err:
        ToolPlan(req, None)
    assert err.value.param == "tool_choice"
    for name in TOOL_PARSERS:
        assert name in str(err.value), name
    assert "openai" in TOOL_PARSERS


def test_unknown_parser_is_named():
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")


def _100kb(prefix: str, unit: str) -> str:
    return prefix + unit * (-(-(100_000 - len(prefix)) // len(unit)))


ADVERSARIAL = [
    _100kb("", "<tool_call>"),
    _100kb("<tool_call>{", '"name": "'),
    _100kb("[TOOL_CALLS]", "a[ARGS]"),
    _100kb("", "["),
    _100kb('{"name": "f", "parameters": ', "["),
    _100kb("", "<tool"),
    _100kb("<tool_call>", '{"a":'),
    _100kb("", "<tool_call>{}</tool_call>"),
    _100kb('<|python_tag|>', '{"name": "f", "parameters": {}}; '),
    _100kb("[", '{"name": "f", "parameters": {"x": "\\u00'),
]


def _parses_fast(parser_cls, text: str) -> None:
    """A fresh ``parser_cls`` parses ``text`` (partial and final) in well under a second.

    A guard against super-linear scans (a backtracking regex or a rescan per character), not a
    benchmark: a linear parse of 100 kB takes ~5-20 ms here, a quadratic one seconds to minutes,
    so the bar sits far above the linear time (50 ms failed on an overloaded 2-core machine)."""
    for final in (False, True):
        best = float("inf")
        for _ in range(3):  # the best of three: the shared CI machine may preempt one run
            t0 = time.perf_counter()
            parser_cls().parse(text, final)
            best = min(best, time.perf_counter() - t0)
        assert best < 0.5, f"{parser_cls.name} on {text[:40]!r}...: {best * 1e3:.1f} ms"


@pytest.mark.parametrize("parser_cls", [HermesParser, Llama3JsonParser, MistralParser, RequiredParser])
@pytest.mark.parametrize("i", range(len(ADVERSARIAL)))
def test_adversarial_100kb_parses_fast(parser_cls, i):
    assert len(ADVERSARIAL[i]) >= 100_000
    _parses_fast(parser_cls, ADVERSARIAL[i])
