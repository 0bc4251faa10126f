"""``--tool-parser-plugin``: a parser file written for vLLM (only its import line changed)
registers its names, parses whole responses through its ``extract_tool_calls`` and streams
the same calls; a broken plugin fails loudly at start-up, a plugin that raises on one output
returns it as content."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from tests.ids_walks import CountedIds
from test_tool_parsers import _stream

from tessellm.entrypoints.openai.protocol import ChatCompletionRequest
from tessellm.entrypoints.openai.tool_parsers import (DeltaMessage, ExtractedToolCallInformation, ToolParser,
                                                      ToolParserManager, get_tool_parser, tool_parser_names)
from tessellm.entrypoints.openai.tools import ToolCallView, ToolPlan

PLUGIN = str(Path(__file__).parent / "vllm_tool_parser_plugin.py")
STREAMING_PLUGIN = str(Path(__file__).parent / "vllm_streaming_tool_parser_plugin.py")  # toy_stream
OUTPUT = 'Let me check.<<call>>[{"name": "get_weather", "arguments": {"city": "Paris"}}, ' \
         '{"name": "get_time", "arguments": {}}]<</call>>'


@contextmanager
def _restored():
    """Whatever a test registers is gone after it (the registry is vLLM's class attribute)."""
    parsers, loaded = dict(ToolParserManager.tool_parsers), set(ToolParserManager.loaded_plugins)
    try:
        yield
    finally:
        ToolParserManager.tool_parsers.clear()
        ToolParserManager.tool_parsers.update(parsers)
        ToolParserManager.loaded_plugins.clear()
        ToolParserManager.loaded_plugins.update(loaded)


@pytest.fixture
def registry():
    with _restored():
        ToolParserManager.import_tool_parser(PLUGIN)
        yield


def _req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                 tools=[{"type": "function", "function": {"name": "get_weather"}}], **kw)


def test_the_plugin_registers_its_names(registry):
    assert {"toy_json", "toy"} <= set(tool_parser_names())
    parser = get_tool_parser("toy", tokenizer=None, request=_req())
    assert type(parser).__name__ == "ToyJsonToolParser"


def test_whole_and_streamed_responses_are_the_plugins_calls(registry):
    content, calls = ToolCallView(get_tool_parser("toy_json")).final(OUTPUT)
    assert content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c.id.startswith("chatcmpl-tool-") for c in calls)  # the plugin's ids (vLLM's ToolCall default)
    for step in (1, 7):
        streamed_content, streamed = _stream(get_tool_parser("toy_json"), OUTPUT, step)
        assert streamed_content == content
        assert [(c["name"], c["arguments"]) for c in streamed] == \
            [(c.function.name, c.function.arguments) for c in calls]
        assert all(c["id"].startswith("chatcmpl-tool-") for c in streamed)


def test_plain_text_and_a_raising_plugin_are_content(registry):
    assert ToolCallView(get_tool_parser("toy")).final("Just text.") == ("Just text.", [])
    text = "<<call>>explode"
    assert ToolCallView(get_tool_parser("toy")).final(text) == (text, [])


def test_tool_plan_runs_the_plugins_adjust_request():
    with _restored():
        req = _req()
        plan = ToolPlan(req, "toy_json", None, PLUGIN)  # imports the file itself (a Ray Serve replica)
        assert type(plan.parser).__name__ == "ToyJsonToolParser" and req.skip_special_tokens is False


def test_a_built_in_parser_answers_vllms_extract_tool_calls():
    info = get_tool_parser("hermes").extract_tool_calls(
        'Hi <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', _req())
    assert isinstance(info, ExtractedToolCallInformation) and info.tools_called and info.content == "Hi "
    assert info.tool_calls[0].function.name == "f" and json.loads(info.tool_calls[0].function.arguments) == {"x": 1}


def test_register_module_refuses_a_class_that_is_not_a_tool_parser():
    with pytest.raises(TypeError, match="subclass ToolParser"):
        ToolParserManager.register_module("nope", module=dict)


def test_a_missing_or_broken_plugin_fails_loudly(tmp_path):
    with pytest.raises(ValueError, match="--tool-parser-plugin .*no such file"):
        ToolParserManager.import_tool_parser(str(tmp_path / "missing.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("from tessellm.entrypoints.openai.tool_parsers import ToolParzer\n")  # a typo
    with pytest.raises(ValueError, match="failed to import: ImportError.*ToolParzer.*tessellm.entrypoints.openai"):
        ToolParserManager.import_tool_parser(str(broken))


def test_serve_checks_the_parser_name_after_loading_the_plugin():
    from tessellm.entrypoints.cli import build_parser
    from tessellm.entrypoints.serve import _server_config

    with _restored():
        config = _server_config(build_parser().parse_args(
            ["serve", "--tool-parser-plugin", PLUGIN, "--tool-call-parser", "toy_json"]))
        assert config.tool_call_parser == "toy_json" and config.tool_parser_plugin == PLUGIN
        with pytest.raises(ValueError, match="'nope' is not a tool-call parser; choose one of .*qwen3_coder.*toy_json"):
            _server_config(build_parser().parse_args(["serve", "--tool-call-parser", "nope"]))


def test_a_plugin_that_cannot_start_is_a_500_naming_it(tmp_path):
    from tessellm.entrypoints.openai.errors import OpenAIError

    plugin = tmp_path / "needs_tokens.py"
    plugin.write_text(
        "from tessellm.entrypoints.openai.tool_parsers import ToolParser, ToolParserManager\n\n"
        "@ToolParserManager.register_module('needs_tokens')\n"
        "class NeedsTokens(ToolParser):\n"
        "    def __init__(self, tokenizer):\n"
        "        super().__init__(tokenizer)\n"
        "        if self.vocab.get('<tool_call>') is None:\n"
        "            raise RuntimeError('could not locate tool call tokens in the tokenizer')\n")
    with _restored():
        with pytest.raises(OpenAIError) as err:
            ToolPlan(_req(), "needs_tokens", None, str(plugin))
    assert err.value.status == 500
    assert "'needs_tokens' failed to start: RuntimeError: could not locate" in err.value.message


def test_a_newer_vllm_plugin_gets_the_requests_tools(tmp_path):
    """vLLM 0.11+'s ToolParser takes ``(tokenizer, tools=None)``; an older one ``(tokenizer)``."""
    plugin = tmp_path / "with_tools.py"
    plugin.write_text(
        "from tessellm.entrypoints.openai.tool_parsers import ToolParser, ToolParserManager\n\n"
        "@ToolParserManager.register_module('with_tools')\n"
        "class WithTools(ToolParser):\n"
        "    def __init__(self, tokenizer, tools=None):\n"
        "        super().__init__(tokenizer, tools)\n")
    with _restored():
        ToolParserManager.import_tool_parser(str(plugin))
        req = _req()
        assert get_tool_parser("with_tools", None, req).tools == req.tools


def test_a_ray_serve_config_checks_the_parser_and_makes_the_plugin_path_absolute(monkeypatch):
    """A replica imports the plugin again in its own process and working directory."""
    from tessellm.entrypoints.ray_serve.config import parse_config

    monkeypatch.chdir(Path(PLUGIN).parent)
    with _restored():
        server = {"tool_parser_plugin": Path(PLUGIN).name, "tool_call_parser": "toy_json"}
        config = parse_config({"engine": {"device": "cpu"}, "server": server}).server_config()
        assert config.tool_parser_plugin == PLUGIN and config.tool_call_parser == "toy_json"
        with pytest.raises(ValueError, match="'nope' is not a tool-call parser"):
            parse_config({"engine": {"device": "cpu"}, "server": {"tool_call_parser": "nope"}}).server_config()


@pytest.fixture
def streaming_plugin():
    with _restored():
        ToolParserManager.import_tool_parser(STREAMING_PLUGIN)
        yield


def _plugin_stream(text: str, step: int):
    """Stream ``text`` through a new ``toy_stream`` parser with one token id per character."""
    parser = get_tool_parser("toy_stream", request=_req())
    view, events = ToolCallView(parser), []
    for n in list(range(step, len(text), step)) + [len(text)]:
        events.append(view.delta(text[:n], final=n == len(text), token_ids=range(n)))
    return parser, view, events


def test_a_plugin_streams_its_calls_as_they_are_produced(streaming_plugin):
    text = 'Checking.<<get_weather|{"city": "Paris"}>><<get_time|{}>>'
    parser, view, events = _plugin_stream(text, 4)
    content = "".join(c for c, _ in events)
    assert content == "Checking."
    first = next(i for i, (_, pieces) in enumerate(events) if pieces)
    assert first < len(events) - 1  # the first call's name came before the output ended
    calls = {}
    for _, pieces in events:
        for p in pieces:
            if p.function.name:
                assert p.id and p.id.startswith("call_") and p.type == "function"  # an id where it had none
                calls[p.index] = [p.function.name, ""]
            calls[p.index][1] += p.function.arguments or ""
    assert [tuple(calls[i]) for i in sorted(calls)] == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    assert view.num_calls == 2
    # vLLM's arguments: the texts and token ids before and after each delta
    for previous, current, delta, previous_ids, ids, delta_ids in parser.seen:
        assert previous + delta == current and text.startswith(current)
        assert previous_ids == list(range(len(previous))) and ids == list(range(len(current)))
        assert delta_ids == ids[len(previous_ids):]


def test_each_streamed_choice_has_its_own_plugin_parser(streaming_plugin):
    """``n`` > 1: the choices' deltas interleave; a plugin keeps its stream's state in the parser
    (the calls it announced, the arguments it sent), so one parser shared by the choices mixed
    their calls up."""
    plan = ToolPlan(_req(n=2, tool_choice="auto"), "toy_stream")
    texts = ['A<<get_weather|{"city": "Paris"}>>', 'B<<get_time|{"tz": "CET"}>><<get_weather|{}>>']
    views, got = [plan.view(), plan.view()], [["", {}], ["", {}]]
    for n in range(3, max(map(len, texts)) + 3, 3):
        for i, (view, text) in enumerate(zip(views, texts)):
            if n - 3 < len(text):
                content, pieces = view.delta(text[:n], final=n >= len(text), token_ids=range(min(n, len(text))))
                got[i][0] += content
                for p in pieces:
                    call = got[i][1].setdefault(p.index, [p.function.name, ""])
                    call[1] += p.function.arguments or ""
    assert [(c, [tuple(calls[k]) for k in sorted(calls)]) for c, calls in got] == [
        ("A", [("get_weather", '{"city": "Paris"}')]), ("B", [("get_time", '{"tz": "CET"}'), ("get_weather", "{}")])]


def test_the_end_of_a_plugin_stream_sends_the_arguments_it_held_back(streaming_plugin):
    text = "<<f|{\"n\": 9"
    _, _, events = _plugin_stream(text, 3)
    args = "".join(p.function.arguments or "" for _, pieces in events for p in pieces)
    assert args == '{"n": 9'  # prev_tool_call_arr's arguments, less streamed_args_for_tool


def test_a_plugin_that_raises_mid_stream_leaves_the_rest_as_content(streaming_plugin):
    text = "Fine so far, then boom and more."
    _, _, events = _plugin_stream(text, 5)
    assert "".join(c for c, _ in events) == text


class _DeltaReader(ToolParser):
    """A streaming plugin that reads only the delta's ids, keeping what it was handed."""

    def __init__(self, tokenizer=None):
        super().__init__(tokenizer)
        self.handed = []

    def extract_tool_calls_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                     current_token_ids, delta_token_ids, request):
        self.handed.append((previous_token_ids, current_token_ids, delta_token_ids))
        return DeltaMessage(content=delta_text)


def test_a_plugin_stream_hands_views_of_the_ids_not_copies():
    """Each delta costs the delta, as the reasoning plugins' streams do (it copied all the ids
    so far every delta: a stream's cost grew with the square of its length)."""
    parser, ids, text = _DeltaReader(), CountedIds(), ""
    view = ToolCallView(parser)
    for i in range(2_000):
        ids.append(10 + i)
        text += "x"
        assert view.delta(text, final=False, token_ids=ids) == ("x", [])
    assert ids.walks == 0
    previous, current, delta = parser.handed[-1]
    assert delta == [2_009] and len(previous) == 1_999 and len(current) == 2_000
    assert previous + delta == list(current) and current[-2:] == [2_008, 2_009]
    assert list(parser.handed[0][0]) == [] and list(parser.handed[0][1]) == [10]
