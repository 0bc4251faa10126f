"""The newer tool-call formats (deepseek_v4, hy_v3, functiongemma, gigachat3, kimi_k3, ...) on
model-shaped outputs (the shapes of vLLM's own test cases): whole, streamed prefix by prefix
and cut at random places (the deltas reassemble to the whole response), typed by the
request's tool schema, refused when not a call, and fast on adversarial input."""

from __future__ import annotations

import json

import pytest
from test_tool_parsers import (_100kb, _calls, _parses_fast, _stream, check_random_chunkings, check_stream,
                               check_whole)

from tessellm.entrypoints.openai.protocol import ChatCompletionRequest
from tessellm.entrypoints.openai.tool_parsers import TOOL_PARSERS, get_tool_parser
from tessellm.entrypoints.openai.tools import ToolCallView

W = {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}
WJ = json.dumps(W)
DSML4 = ("<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>")
FG = ("<start_function_call>", "<end_function_call>", "<escape>")
GIGA3, GIGA31 = "<|message_sep|>\n\nfunction call<|role_sep|>\n", "<|function_call|>"
K3_TOOLS, K3_END = "<|open|>tools<|sep|>", "<|close|>tools<|sep|>"
K3_RESPONSE = ("<|open|>response<|sep|>", "<|close|>response<|sep|>")
ACTION = ("<|START_ACTION|>", "<|END_ACTION|>")
NS = "]<]minimax[>["
INK = {"model": "<|message_model|>", "text": "<|content_text|>", "think": "<|content_thinking|>",
       "call": "<|content_invoke_tool_json|>", "raw": "<|content_invoke_tool_text|>", "error": "<|content_tool_error|>",
       "end": "<|end_message|>", "stop": "<|content_model_end_sampling|>"}


def _ink(kind: str, body: str, header: str = "") -> str:
    """One Inkling block; the output's first block opens after the prompt's <|message_model|>."""
    return INK["model"] + header + INK[kind] + body + INK["end"]


def _m3(*invokes: str) -> str:
    return f"{NS}<tool_call>\n" + "\n".join(invokes) + f"\n{NS}</tool_call>"


def _m3_invoke(name: str, body: str) -> str:
    """``body`` with ``<`` and ``</`` of its tags written plainly; each gets the namespace."""
    return f'{NS}<invoke name="{name}">' + body.replace("<", NS + "<") + f"{NS}</invoke>"


def _hy(name: str, args: dict) -> str:
    pairs = "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in args.items())
    return f"<tool_call>{name}<tool_sep>{pairs}</tool_call>"


def _fg(name: str, args: dict) -> str:
    pairs = ",".join(f"{k}:{FG[2]}{v}{FG[2]}" for k, v in args.items())
    return f"{FG[0]}call:{name}{{{pairs}}}{FG[1]}"


def _k3(name: str, args: dict, index: int = 1) -> str:
    body = "".join(f'<|open|>argument key="{k}" type="{t}"<|sep|>{v}<|close|>argument<|sep|>'
                   for k, (t, v) in args.items())
    return f'<|open|>call tool="{name}" index="{index}"<|sep|>{body}<|close|>call<|sep|>'


# (parser name, model output, expected content, expected [(name, arguments)])
RECORDED = [
    ("deepseek_v4", "Let me check.\n\n" + DSML4[0] + '\n<｜DSML｜invoke name="get_current_weather">\n'
     '<｜DSML｜parameter name="city" string="true">Dallas</｜DSML｜parameter>\n<｜DSML｜parameter name="state" '
     'string="true">TX</｜DSML｜parameter>\n<｜DSML｜parameter name="unit" string="true">fahrenheit</｜DSML｜parameter>'
     '\n</｜DSML｜invoke>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>'
     '\n</｜DSML｜invoke>\n' + DSML4[1], "Let me check.\n\n", [("get_current_weather", W), ("f", {"days": 3})]),
    ("deepseek_v4", DSML4[0] + '<｜DSML｜invoke name="a"></｜DSML｜invoke>' + DSML4[1] + " ok", " ok", [("a", {})]),
    ("deepseek_v4", '<｜DSML｜function_calls><｜DSML｜invoke name="a"></｜DSML｜invoke></｜DSML｜function_calls>',
     '<｜DSML｜function_calls><｜DSML｜invoke name="a"></｜DSML｜invoke></｜DSML｜function_calls>', []),  # V3.2's section
    ("hy_v3", "I will check.<tool_calls>" + _hy("get_current_weather", W) + "\n" + _hy("get_time", {})
     + "</tool_calls>", "I will check.", [("get_current_weather", W), ("get_time", {})]),
    ("hy_v3", "<tool_calls>" + _hy("a", {}) + "</tool_calls>\nDone.", "\nDone.", [("a", {})]),
    ("hy_v3", "The <tool_call> tag is how I call tools.", "The <tool_call> tag is how I call tools.", []),
    ("functiongemma", _fg("get_current_weather", W), "", [("get_current_weather", W)]),
    ("functiongemma", "Sure. " + _fg("get_time", {}) + _fg("f", {"n": 3, "ok": "true", "s": "a, b}"}) + " done",
     "Sure.  done", [("get_time", {}), ("f", {"n": 3, "ok": True, "s": "a, b}"})]),
    ("functiongemma", "How can I help you today?", "How can I help you today?", []),
    ("gigachat3", "I'll check that for you." + GIGA3 + json.dumps({"name": "manage_user_memory", "arguments": W}),
     "I'll check that for you.", [("manage_user_memory", W)]),
    ("gigachat3", GIGA3 + '{"name": "a", "arguments": {}}</s>', "", [("a", {})]),
    ("gigachat3", "Hi" + GIGA31 + '{"name": "a", "arguments": {"x": {"y": [true]}}}</s>', "Hi",
     [("a", {"x": {"y": [True]}})]),
    ("gigachat3", "How can I help you today?", "How can I help you today?", []),
    ("kimi_k3", K3_RESPONSE[0] + "Let me check." + K3_RESPONSE[1] + K3_TOOLS + "\n"
     + _k3("get_current_weather", {k: ("string", v) for k, v in W.items()}) + "\n"
     + _k3("f", {"code": ("string", 'print("}")'), "n": ("integer", "3"), "o": ("object", '{"a": [1]}')}, 2)
     + "\n" + K3_END, "Let me check.",
     [("get_current_weather", W), ("f", {"code": 'print("}")', "n": 3, "o": {"a": [1]}})]),
    ("kimi_k3", "Hello there." + K3_RESPONSE[1], "Hello there.", []),  # the response's open marker was the prompt's
    ("kimi_k3", K3_TOOLS + _k3("a", {}) + K3_END + "<|close|>message<|sep|>", "", [("a", {})]),
    ("kimi_k3", K3_TOOLS + '<|open|>call tool="a&amp;b" index="1"<|sep|><|open|>argument key="q&quot;" '
     'type="number"<|sep|>oops<|close|>argument<|sep|><|close|>call<|sep|>' + K3_END, "", [("a&b", {'q"': "oops"})]),
    ("cohere_command3", ACTION[0] + '\n[\n    {"tool_call_id": "0", "tool_name": "foo", "parameters": {"query": "q1"}},'
     '\n    {"tool_call_id": "1", "tool_name": "bar", "parameters": {"x": 42}}\n]\n' + ACTION[1], "",
     [("foo", {"query": "q1"}), ("bar", {"x": 42})]),
    ("cohere_command4", "Let me look.\n" + ACTION[0] + '[{"tool_call_id": "0", "tool_name": "get_current_weather", '
     '"parameters": ' + WJ + "}]" + ACTION[1] + " ok", "Let me look.\n ok", [("get_current_weather", W)]),
    ("cohere_command3", ACTION[0] + '[{"tool_call_id": "0", "tool_name": "a", "parameters": {}}]', "", [("a", {})]),
    ("cohere_command4", ACTION[0] + '[{"tool_call_id": "0", "tool_name": "a", "parameters": {"x": 1}}] and then text',
     ACTION[0] + '[{"tool_call_id": "0", "tool_name": "a", "parameters": {"x": 1}}] and then text', []),  # no end tag
    ("cohere_command4", "The answer is 4.", "The answer is 4.", []),
    ("solar_open2", "Checking.\n<|tool_call:start|>get_current_weather\n" + "".join(
        f"<|tool_arg:start|>{k}<|tool_arg:value|>{v}<|tool_arg:end|>" for k, v in W.items())
     + "<|tool_call:end|><|tool_call:start|>get_time\n<|tool_call:end|> done", "Checking.\n done",
     [("get_current_weather", W), ("get_time", {})]),
    ("minimax_m3", "I will check.\n" + _m3(_m3_invoke("get_current_weather", "".join(
        f"<{k}>{v}</{k}>" for k, v in W.items())), _m3_invoke("get_time", "")), "I will check.\n",
     [("get_current_weather", W), ("get_time", {})]),
    ("minimax_m3", _m3(_m3_invoke("f", "<o><a>1</a><a>2</a><b>x</b></o>")) + " ok", " ok",
     [("f", {"o": {"a": ["1", "2"], "b": "x"}})]),  # no schema: objects of text, repeated names a list
    ("minimax_m3", "plain ]<]minimax[>[<tool_ca", "plain ]<]minimax[>[<tool_ca", []),
    ("minicpm5", 'Sure.\n<function name="get_current_weather">' + "".join(
        f'<param name="{k}">{v}</param>' for k, v in W.items()) + '</function>\n<function name="f"><param name="q">'
     'a &amp; b</param><param name="code"><![CDATA[ if a<b: pass ]]></param></function> ok', "Sure.\n ok",
     [("get_current_weather", W), ("f", {"q": "a & b", "code": " if a<b: pass "})]),
    ("step3p5", "Let me check.\n<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n"
     "<parameter=state>\nTX\n</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>\n</function>\n</tool_call>",
     "Let me check.\n", [("get_current_weather", W)]),
    ("poolside_v1", "Sure.<tool_call>get_current_weather\n<arg_key>city</arg_key>\n<arg_value>Dallas</arg_value>\n"
     "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>", "Sure.",
     [("get_current_weather", {"city": "Dallas", "days": 3})]),
    # Inkling: blocks in any order; the thinking is not content, a header (a function name) neither
    ("inkling", INK["think"] + "I should look it up." + INK["end"] + _ink("text", "Let me check.")
     + _ink("call", '{"name": "get_current_weather", "args": ' + WJ + "}", header="get_current_weather")
     + _ink("call", '{"name": "get_time"}'), "Let me check.", [("get_current_weather", W), ("get_time", {})]),
    ("inkling", INK["text"] + "It is " + INK["stop"] + _ink("text", "sunny.") + _ink("raw", " (raw)")
     + _ink("error", " [no tool]"), "It is sunny. (raw) [no tool]", []),
    ("inkling", INK["call"] + '{"name": "f", "args": {"a": [1, "<|end"]}}' + INK["end"] + "\n", "",
     [("f", {"a": [1, "<|end"]})]),
    ("inkling", "Plain text, no blocks.", "Plain text, no blocks.", []),
    ("inkling", INK["think"] + "Hmm " + INK["text"] + "still thinking" + INK["end"] + _ink("text", "4"), "4", []),
    ("inkling", INK["think"] + "Call:" + INK["call"] + '{"name": "f", "args": {}}' + INK["end"], "", [("f", {})]),
]


@pytest.mark.parametrize("name,text,content,calls", RECORDED)
def test_whole_output(name, text, content, calls):
    check_whole(name, text, content, calls)


@pytest.mark.parametrize("step", [1, 3, 17])
@pytest.mark.parametrize("name,text,content,calls", RECORDED)
def test_streams_reassemble_to_the_whole_output(name, text, content, calls, step):
    check_stream(name, text, content, calls, step)


@pytest.mark.parametrize("seed", range(8))
def test_random_chunkings_reassemble_to_the_whole_output(seed):
    check_random_chunkings(RECORDED, seed)


def _request(properties: dict) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": properties}}}])


def test_hy_v3_types_values_by_the_tool_schema():
    req = _request({"i": {"type": "integer"}, "x": {"type": "number"}, "b": {"type": "boolean"},
                    "s": {"type": "string"}, "o": {"type": "object"}, "bad": {"type": "integer"}})
    text = "<tool_calls>" + _hy("f", {"i": "42", "x": "2.5", "b": "true", "s": "007", "o": '{"k": [1]}',
                                      "bad": "many", "other": "12"}) + "</tool_calls>"
    _, calls = ToolCallView(get_tool_parser("hy_v3", request=req)).final(text)
    assert json.loads(calls[0].function.arguments) == {"i": 42, "x": 2.5, "b": True, "s": "007", "o": {"k": [1]},
                                                       "bad": "many", "other": "12"}


@pytest.mark.parametrize("name,text", [
    ("hy_v3", "<tool_calls><tool_call>f</tool_call></tool_calls>"),  # no <tool_sep>
    ("hy_v3", "<tool_calls><tool_call>f<tool_sep><arg_key>a</arg_key></tool_call></tool_calls>"),
    ("functiongemma", FG[0] + "call:f{a:" + FG[2] + "1}" + FG[1]),  # an unclosed value
    ("functiongemma", FG[0] + "call:f{a:1}" + FG[1]),  # not between escapes
    ("functiongemma", FG[0] + "f{}" + FG[1]),  # no call:
    ("gigachat3", GIGA31 + '{"name": "f", "arguments": {"x": NaN}}'),
    ("gigachat3", GIGA31 + '{"name": "f", "arguments": '),
    ("kimi_k3", K3_TOOLS + '<|open|>call index="1"<|sep|><|close|>call<|sep|>' + K3_END),  # no tool=
    ("kimi_k3", K3_TOOLS + '<|open|>call tool="f"<|sep|>junk<|close|>call<|sep|>' + K3_END),
    ("deepseek_v4", DSML4[0] + '<｜DSML｜invoke name=""></｜DSML｜invoke>' + DSML4[1]),
    ("cohere_command3", ACTION[0] + '[{"tool_call_id": "0", "name": "f", "parameters": {}}]' + ACTION[1]),
    ("cohere_command3", ACTION[0] + '[{"tool_call_id": "0", "tool_name": "f", "parameters": [1]}]' + ACTION[1]),
    ("cohere_command3", ACTION[0] + '[{"tool_call_id": "0", "tool_name": "f"}] and more' + ACTION[1]),
    ("cohere_command4", ACTION[0] + '{"tool_call_id": "0", "tool_name": "f"}' + ACTION[1]),
    ("solar_open2", "<|tool_call:start|>f\n<|tool_arg:start|>a<|tool_arg:value|>x<|tool_call:end|>"),  # unclosed
    ("minimax_m3", _m3(_m3_invoke("f", "<a>1</b>"))),  # closed out of order
    ("minimax_m3", _m3(_m3_invoke("f", "<o>text<a>1</a></o>"))),  # text beside elements
    ("minimax_m3", _m3(_m3_invoke("f", "<a>1"))),  # unclosed
    ("minimax_m3", _m3(_m3_invoke("f", "<a>" * 40 + "1" + "</a>" * 40))),  # deeper than MAX_DEPTH
])
def test_a_malformed_call_is_content(name, text):
    content, calls = ToolCallView(get_tool_parser(name)).final(text)
    assert calls == [] and content == text


@pytest.mark.parametrize("text,content,calls", [
    (_ink("call", '{"name": "f"}') + _ink("text", "and") + _ink("call", "{oops}") + _ink("call", '{"name": "g"}'),
     'and{oops}{"name": "g"}', [("f", {})]),
    (_ink("call", '{"args": {}}'), '{"args": {}}', []),  # no name
    (INK["call"] + '{"name": "f", "args": ', '{"name": "f", "args": ', []),  # cut off
])
def test_inkling_a_tool_block_that_is_not_a_call(text, content, calls):
    """It and every tool block after it are content, each where it stands (markers dropped);
    the calls before it stay calls. Streamed: the content reassembles to the same (the call
    being written when it turned out not to be one had its name sent: it cannot be withdrawn)."""
    got_content, got_calls = ToolCallView(get_tool_parser("inkling")).final(text)
    assert (got_content or "", _calls(got_calls)) == (content, calls)
    for step in (1, 3, 17):
        streamed, _ = _stream(get_tool_parser("inkling"), text, step)
        assert streamed == content


def test_minimax_m3_reads_nested_arguments_by_the_tool_schema():
    """vLLM's order example: scalars typed, objects nested, an array of items, an object of
    additional properties, a repeated name collected in a list."""
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {
        "name": "create_order", "parameters": {"type": "object", "properties": {
            "user_id": {"type": "integer"}, "urgent": {"type": "boolean"}, "note": {"type": "string"},
            "shipping": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}}},
            "items": {"type": "array", "items": {"type": "object", "properties": {
                "sku": {"type": "string"}, "qty": {"type": "integer"}}}},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "duplicate_demo": {"type": "object"}}}}}])
    body = ("<user_id>42</user_id><urgent>true</urgent><note>Please leave at front desk.</note>"
            "<shipping><city>Singapore</city><zip>018956</zip></shipping>"
            "<items><item><sku>book-001</sku><qty>2</qty></item><item><sku>pen-007</sku><qty>5</qty></item></items>"
            "<metadata><source>mobile</source><campaign>may-launch</campaign></metadata>"
            "<duplicate_demo><tag>a</tag><tag>b</tag></duplicate_demo>")
    text = "I will create it.\n" + _m3(_m3_invoke("create_order", body))
    content, calls = ToolCallView(get_tool_parser("minimax_m3", request=req)).final(text)
    assert content == "I will create it.\n"
    assert _calls(calls) == [("create_order", {
        "user_id": 42, "urgent": True, "note": "Please leave at front desk.",
        "shipping": {"city": "Singapore", "zip": 18956},
        "items": [{"sku": "book-001", "qty": 2}, {"sku": "pen-007", "qty": 5}],
        "metadata": {"source": "mobile", "campaign": "may-launch"}, "duplicate_demo": {"tag": ["a", "b"]}})]


def test_functiongemma_values_that_are_not_strict_json_stay_text():
    _, calls = ToolCallView(get_tool_parser("functiongemma")).final(_fg("f", {"x": "NaN", "y": "[1, Infinity]"}))
    assert json.loads(calls[0].function.arguments) == {"x": "NaN", "y": "[1, Infinity]"}


def test_cohere_command_keeps_the_models_call_ids():
    text = ACTION[0] + '[{"tool_call_id": "7", "tool_name": "a", "parameters": {}}]' + ACTION[1]
    _, calls = ToolCallView(get_tool_parser("cohere_command3")).final(text)
    _, streamed = _stream(get_tool_parser("cohere_command3"), text, 5)
    assert calls[0].id == streamed[0]["id"] == "7"


ADDED_NAMES = ("deepseek_v4", "hy_v3", "functiongemma", "gigachat3", "kimi_k3", "cohere_command3", "cohere_command4",
               "step3p5", "poolside_v1", "solar_open2", "minimax_m3", "minicpm5", "inkling")


def test_every_added_name_is_registered():
    assert set(ADDED_NAMES) <= set(TOOL_PARSERS)


M3_INVOKE = NS + "<tool_call>" + NS + '<invoke name="f">'
ADVERSARIAL = [
    _100kb("<tool_calls>", "<tool_call>f<tool_sep>"), _100kb("<tool_calls><tool_call>f<tool_sep>", "<arg_key>"),
    _100kb("", FG[0] + "call:f{"), _100kb(FG[0] + "call:f{", "a:" + FG[2]), _100kb(FG[0] + "call:f{", "a:,"),
    _100kb("", GIGA31), _100kb(GIGA31, '{"name": "'), _100kb("", "<|message_sep|>\n"),
    _100kb(K3_TOOLS, '<|open|>call tool="'), _100kb(K3_TOOLS + '<|open|>call tool="f"<|sep|>', "<|open|>argument "),
    _100kb("", K3_RESPONSE[1]), _100kb(K3_TOOLS, 'a="b" '), _100kb(DSML4[0], '<｜DSML｜invoke name="f">'),
    _100kb(ACTION[0] + "[", '{"tool_call_id": "0", "tool_name": "f", "parameters": {"a": ['),
    _100kb(ACTION[0] + "[", '{"tool_call_id": "0", "tool_name": "f", "parameters": {}}, '), _100kb("", ACTION[0]),
    _100kb("<|tool_call:start|>f\n", "<|tool_arg:start|>a<|tool_arg:value|>"), _100kb("", "<|tool_call:start|>"),
    _100kb(NS + "<tool_call>", NS + '<invoke name="f">'), _100kb(M3_INVOKE, NS + "<a>"),
    _100kb(M3_INVOKE, NS + "<a>1" + NS + "</a>"), _100kb("", NS),
    _100kb("", INK["model"]), _100kb("", INK["call"] + "{" + INK["end"]), _100kb(INK["call"], '{"name": "'),
    _100kb("", INK["text"] + "a" + INK["end"]), _100kb(INK["think"], INK["text"]), _100kb("", "<|content_"),
]
ADDED = [TOOL_PARSERS[n] for n in ADDED_NAMES]


@pytest.mark.parametrize("parser_cls", ADDED, ids=lambda c: c.name)
def test_adversarial_100kb_parses_fast(parser_cls):
    for text in ADVERSARIAL:
        _parses_fast(parser_cls, text)
