"""vLLM's other tool-call formats (qwen3_coder, glm45, pythonic, deepseek, kimi_k2, granite,
xlam, ...) on model-shaped outputs (the shapes of vLLM's own test cases): whole, streamed
prefix by prefix (the deltas reassemble to the whole response), typed by the request's tool
schema, refused when not a call, and fast on adversarial input."""

from __future__ import annotations

import json
import sys

import pytest
from test_tool_parsers import (_100kb, _parses_fast, _stream, check_random_chunkings, check_stream,
                               check_whole)

from tessellm.entrypoints.openai.protocol import ChatCompletionRequest
from tessellm.entrypoints.openai.tool_parsers import TOOL_PARSERS, get_tool_parser
from tessellm.entrypoints.openai.tools import ToolCallView

W = {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}
WJ = json.dumps(W)
DS = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>")
QWEN_CALL = ("<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n"
             "<parameter=state>\nTX\n</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>\n</function>\n"
             "</tool_call>")
Q = '<|"|>'  # Gemma 4's string delimiter
STEP3 = ("<｜tool_calls_begin｜>", "<｜tool_call_begin｜>function<｜tool_sep｜>", "<｜tool_call_end｜>",
         "<｜tool_calls_end｜>")
DSML = ("<｜DSML｜function_calls>", "</｜DSML｜function_calls>")
KIMI = ("<|tool_calls_section_begin|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>",
        "<|tool_calls_section_end|>")

# (parser name, model output, expected content, expected [(name, arguments)])
RECORDED = [
    ("qwen3_coder", QWEN_CALL, "", [("get_current_weather", W)]),
    ("qwen3_coder", "Sure! Let me check the weather for you." + QWEN_CALL + "\n" + QWEN_CALL,
     "Sure! Let me check the weather for you.", [("get_current_weather", W)] * 2),
    ("qwen3_xml", "<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n</function>", "",
     [("get_current_weather", {"city": "Dallas"})]),  # no <tool_call> tags (vLLM's fallback)
    ("qwen3_coder", "<tool_call>\n<function=get_time>\n</function>\n</tool_call>", "", [("get_time", {})]),
    ("qwen3_coder", "I would call <function but will not.", "I would call <function but will not.", []),
    ("seed_oss", "<seed:think>ok</seed:think>" + QWEN_CALL.replace("tool_call>", "seed:tool_call>"),
     "<seed:think>ok</seed:think>", [("get_current_weather", W)]),
    ("minimax_m2", 'Checking.<minimax:tool_call>\n<invoke name="get_current_weather">\n<parameter name="city">'
                   'Dallas</parameter>\n<parameter name="state">TX</parameter>\n<parameter name="unit">fahrenheit'
                   '</parameter>\n</invoke>\n<invoke name="get_time"></invoke>\n</minimax:tool_call>', "Checking.",
     [("get_current_weather", W), ("get_time", {})]),
    ("minimax_m2", "<invoke name=\"f\"></invoke>", "<invoke name=\"f\"></invoke>", []),  # outside the block: text
    ("longcat", 'Hi<longcat_tool_call>{"name": "get_current_weather", "arguments": ' + WJ + "}</longcat_tool_call>",
     "Hi", [("get_current_weather", W)]),
    ("glm45", "Let me check.<tool_call>get_current_weather\n<arg_key>city</arg_key>\n<arg_value>Dallas</arg_value>\n"
              "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>", "Let me check.",
     [("get_current_weather", {"city": "Dallas", "days": 3})]),
    ("glm47", "<tool_call>get_current_weather<arg_key>city</arg_key><arg_value>Dallas</arg_value></tool_call>"
              "<tool_call>get_time</tool_call>", "", [("get_current_weather", {"city": "Dallas"}), ("get_time", {})]),
    ("pythonic", "[get_weather(city='San Francisco', metric='celsius')]", "",
     [("get_weather", {"city": "San Francisco", "metric": "celsius"})]),
    ("pythonic", "[register_user(name='John Doe', age=37, address={'city': 'San Francisco', 'state': 'CA'}, "
                 "role=None, passed_test=True, aliases=['John', 'Johnny']), get_weather()]", "",
     [("register_user", {"name": "John Doe", "age": 37, "address": {"city": "San Francisco", "state": "CA"},
                         "role": None, "passed_test": True, "aliases": ["John", "Johnny"]}), ("get_weather", {})]),
    ("pythonic", r"[get_weather(city='Martha\'s Vineyard', metric='\"cool units\")')]", "",
     [("get_weather", {"city": "Martha's Vineyard", "metric": '"cool units")'})]),
    ("pythonic", "How can I help you today?", "How can I help you today?", []),
    ("llama4_pythonic", "<|python_start|>[get_weather(city='Paris', n=-2, t=(1, 2.5))]<|python_end|>", "",
     [("get_weather", {"city": "Paris", "n": -2, "t": [1, 2.5]})]),
    ("olmo3", "<function_calls>get_weather(city='Paris', days=null, ok=true)\nget_time()</function_calls>", "",
     [("get_weather", {"city": "Paris", "days": None, "ok": True}), ("get_time", {})]),
    ("olmo3", "get_time()", "get_time()", []),  # no tag: text
    ("granite-20b-fc", 'Sure <function_call> {"name": "get_current_weather", "arguments": ' + WJ + "}\n"
     '<function_call> {"name": "get_time", "arguments": {}}', "Sure ", [("get_current_weather", W), ("get_time", {})]),
    ("deepseek_v3", "Checking." + DS[0] + DS[1] + "function" + DS[2] + "get_current_weather\n```json\n" + WJ + "\n```"
     + DS[3] + "\n" + DS[1] + "function" + DS[2] + "get_time\n```json\n{}\n```" + DS[3] + DS[4], "Checking.",
     [("get_current_weather", W), ("get_time", {})]),
    ("deepseek_v31", DS[0] + DS[1] + "get_current_weather" + DS[2] + WJ + DS[3] + DS[1] + "get_time" + DS[2] + "{}"
     + DS[3] + DS[4], "", [("get_current_weather", W), ("get_time", {})]),
    ("kimi_k2", "Let me check." + KIMI[0] + KIMI[1] + "functions.get_current_weather:0" + KIMI[2] + WJ + KIMI[3]
     + KIMI[1] + " functions.get_time:1 " + KIMI[2] + "{}" + KIMI[3] + KIMI[4], "Let me check.",
     [("get_current_weather", W), ("get_time", {})]),
    ("granite", '<|tool_call|>[{"name": "get_current_weather", "arguments": ' + WJ + "}]", "",
     [("get_current_weather", W)]),
    ("granite", '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": [1]}}]', "",
     [("a", {}), ("b", {"x": [1]})]),
    ("xlam", '[{"name": "get_current_weather", "arguments": ' + WJ + "}]", "", [("get_current_weather", W)]),
    ("xlam", 'I will check.\n```json\n[{"name": "get_current_weather", "arguments": ' + WJ + "}]\n```",
     "I will check.\n", [("get_current_weather", W)]),
    ("xlam", '[TOOL_CALLS][{"name": "a", "arguments": {}}]', "", [("a", {})]),
    ("xlam", "Use ```print(1)``` here.", "Use ```print(1)``` here.", []),
    ("phi4_mini_json", 'functools[{"name": "get_current_weather", "arguments": ' + WJ + "}]", "",
     [("get_current_weather", W)]),
    ("internlm", 'Sure.<|action_start|><|plugin|>\n{"name": "get_current_weather", "parameters": ' + WJ
     + "}<|action_end|>", "Sure.", [("get_current_weather", W)]),
    ("jamba", '<tool_calls>[{"name": "get_current_weather", "arguments": ' + WJ + "}]</tool_calls>", "",
     [("get_current_weather", W)]),
    ("hunyuan_a13b", 'Ok <tool_calls>[{"name": "a", "arguments": {"x": 1}}]</tool_calls>', "Ok ", [("a", {"x": 1})]),
    ("minimax", 'Ok<tool_calls>\n{"name": "get_current_weather", "arguments": ' + WJ
     + '}\n{"name": "get_time", "arguments": {}}\n</tool_calls>', "Ok", [("get_current_weather", W), ("get_time", {})]),
    ("step3", "Checking." + STEP3[0] + STEP3[1] + '<steptml:invoke name="get_current_weather"><steptml:parameter '
     'name="city">Dallas</steptml:parameter><steptml:parameter name="state">TX</steptml:parameter><steptml:parameter '
     'name="unit">fahrenheit</steptml:parameter></steptml:invoke>' + STEP3[2] + STEP3[1]
     + '<steptml:invoke name="get_time"></steptml:invoke>' + STEP3[2] + STEP3[3], "Checking.",
     [("get_current_weather", W), ("get_time", {})]),
    ("step3", STEP3[0] + STEP3[1] + '<steptml:invoke name="f"></steptml:invoke>' + STEP3[2] + STEP3[3] + " Done.",
     " Done.", [("f", {})]),  # text after the calls: content (vLLM keeps it too)
    ("deepseek_v32", "Let me check.\n\n" + DSML[0] + '\n<｜DSML｜invoke name="get_current_weather">\n'
     '<｜DSML｜parameter name="city" string="true">Dallas</｜DSML｜parameter>\n<｜DSML｜parameter name="state" '
     'string="true">TX</｜DSML｜parameter>\n<｜DSML｜parameter name="unit" string="true">fahrenheit</｜DSML｜parameter>'
     '\n</｜DSML｜invoke>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>'
     '\n<｜DSML｜parameter name="code" string="true">007</｜DSML｜parameter>\n</｜DSML｜invoke>\n' + DSML[1],
     "Let me check.\n\n", [("get_current_weather", W), ("f", {"days": 3, "code": "007"})]),
    ("deepseek_v32", '<｜DSML｜invoke name="f"></｜DSML｜invoke>', '<｜DSML｜invoke name="f"></｜DSML｜invoke>', []),
    ("ernie45", "I will check.\n\n<tool_call>\n" + '{"name": "get_current_weather", "arguments": ' + WJ
     + "}\n</tool_call>\n<tool_call>\n" + '{"name": "get_time", "arguments": {}}\n</tool_call>\n', "I will check.",
     [("get_current_weather", W), ("get_time", {})]),
    ("ernie45", "Paris is sunny.\n\n", "Paris is sunny.\n\n", []),
    # the <response> envelope is dropped (as vLLM's): the newlines before it, its tags, what follows it
    ("ernie45", "\n\n<response>\nParis is sunny.\n</response>\n", "\nParis is sunny.\n", []),
    ("ernie45", "<response>\nI will check.\n</response>\n\n<tool_call>\n" + '{"name": "get_time", "arguments": {}}'
     "\n</tool_call>\n", "\nI will check.\n", [("get_time", {})]),
    ("ernie45", "<response>It is <b>4</b>.", "It is <b>4</b>.", []),  # cut off before its close tag
    ("gemma4", "Sure.<|tool_call>call:get_current_weather{city:" + Q + "Dallas" + Q + ",state:" + Q + "TX" + Q
     + ",unit:" + Q + "fahrenheit" + Q + "}<tool_call|><|tool_call>call:get_time{}<tool_call|>", "Sure.",
     [("get_current_weather", W), ("get_time", {})]),
    ("gemma4", "<|tool_call>call:f{n:-2.5e3,ok:false,none:null,word:NaN,list:[" + Q + "a, b" + Q
     + ",[1],{k:" + Q + "}" + Q + "}],o:{inner:{deep:true}}}<tool_call|>", "",
     [("f", {"n": -2500.0, "ok": False, "none": None, "word": "NaN", "list": ["a, b", [1], {"k": "}"}],
             "o": {"inner": {"deep": True}}})]),
    ("gemma4", "<|tool_call>call:f{a:1}<tool_call|>\nThat is all.", "\nThat is all.", [("f", {"a": 1})]),
    ("mimo", QWEN_CALL, "", [("get_current_weather", W)]),
    ("apertus", 'I will check. <|tools_prefix|>[{"get_current_weather": ' + WJ + '}, {"get_time": {}}]<|tools_suffix|>'
     " Done.", "I will check.  Done.", [("get_current_weather", W), ("get_time", {})]),
    ("apertus", '<|tools_prefix|>[{"a": {}, "b": {}}]<|tools_suffix|>', '<|tools_prefix|>[{"a": {}, "b": {}}]'
     "<|tools_suffix|>", []),  # two keys: not a call
    ("lfm2", "Let me check.<|tool_call_start|>[get_current_weather(city='Dallas', state='TX', unit='fahrenheit'), "
     "get_time()]<|tool_call_end|>\nChecking now.", "Let me check.\nChecking now.",
     [("get_current_weather", W), ("get_time", {})]),
    ("lfm2", "A<|tool_call_start|>[] oops<|tool_call_end|>", "A<|tool_call_start|>[] oops<|tool_call_end|>",
     []),  # an empty list is no call, while streaming too (the stream had sent "A oops")
    ("lfm2", "<|tool_call_start|>[f(x=1)] oops<|tool_call_end|>", " oops<|tool_call_end|>", [("f", {"x": 1})]),
    # LFM2's echo of the call after the end token, through the next end token: dropped (as vLLM's)
    ("lfm2", "Checking.<|tool_call_start|>[f(x=1)]<|tool_call_end|>[f(x=1)]<|tool_call_end|>\nDone.",
     "Checking.\nDone.", [("f", {"x": 1})]),
    ("lfm2", "<|tool_call_start|>[f(x=1)]<|tool_call_end|>\n<|tool_call_start|>[f(x=1)]<|tool_call_end|>"
     " [f(x=1)]<|tool_call_end|>", "", [("f", {"x": 1})]),
    ("lfm2", "<|tool_call_start|>[f(x=1)]<|tool_call_end|>\n[f(x=1)", "\n[f(x=1)", [("f", {"x": 1})]),  # no end
    ("lfm2", "<|tool_call_start|>[f(x=1)]<|tool_call_end|> It is <b>4</b><|tool_call_end|>",
     " It is <b>4</b><|tool_call_end|>", [("f", {"x": 1})]),  # prose first: all of it content

    ("granite4", 'Sure.<tool_call>{"name": "get_current_weather", "arguments": ' + WJ + '}</tool_call>\nThen:'
     '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "Sure.\nThen:",
     [("get_current_weather", W), ("get_time", {})]),
]
# all text outside the calls (between them, after the list) is content, after the text before
A, QW = [("a", {})], [("get_current_weather", W)]
TAILS = [
    ("granite", '[{"name": "a", "arguments": {}}] and done.', " and done.", A),
    ("xlam", 'I will check.\n```json\n[{"name": "a", "arguments": {}}]\n```\nDone.', "I will check.\n\nDone.", A),
    ("xlam", '\n[{"name": "a", "arguments": {}}] ok', " ok", A),  # the newline before the list: no content streamed
    ("jamba", '<tool_calls>[{"name": "a", "arguments": {}}]</tool_calls> ok', " ok", A),
    ("internlm", '<|action_start|><|plugin|>{"name": "a", "parameters": {}}<|action_end|>ok', "ok", A),
    ("minimax", '<tool_calls>\n{"name": "a", "arguments": {}}\n</tool_calls>\nok', "\nok", A),
    ("qwen3_coder", "Hi." + QWEN_CALL + "\nThe weather is coming.", "Hi.\nThe weather is coming.", QW),
    ("qwen3_coder", QWEN_CALL + " see <tool_call> later", " see <tool_call> later", QW),  # a tag with no call: text
    ("qwen3_coder", "A" + QWEN_CALL + "\nand B:\n" + QWEN_CALL + "\n", "A\nand B:\n", QW * 2),
    ("hermes", 'A<tool_call>{"name": "a", "arguments": {}}</tool_call>\n and <tool_call>{"name": "a", '
     '"arguments": {}}</tool_call>\n\n', "A\n and ", A * 2),
    ("deepseek_v31", DS[0] + DS[1] + "a" + DS[2] + "{}" + DS[3] + " then " + DS[1] + "a" + DS[2] + "{}" + DS[3] + DS[4]
     + " done", " then  done", A * 2),
    ("kimi_k2", KIMI[0] + KIMI[1] + "functions.a:0" + KIMI[2] + "{}" + KIMI[3] + KIMI[4] + "\nok", "\nok", A),
    ("granite-20b-fc", '<function_call> {"name": "a", "arguments": {}} so <function_call> {"name": "a", '
     '"arguments": {}}', " so ", A * 2),
    ("gemma4", "<|tool_call>call:a{}<tool_call|> and <|tool_call>call:a{}<tool_call|>", " and ", A * 2),
    ("mistral", 'Hi [TOOL_CALLS][{"name": "a", "arguments": {}}] ok', "Hi  ok", A),
    ("minimax_m2", '<minimax:tool_call><invoke name="a"></invoke></minimax:tool_call>ok', "ok", A),
    ("glm45", "<tool_call>a</tool_call>\nok", "\nok", A),
    ("deepseek_v32", DSML[0] + '<｜DSML｜invoke name="a"></｜DSML｜invoke>' + DSML[1] + "ok", "ok", A),
]
RECORDED += TAILS


@pytest.mark.parametrize("name,text,content,calls", RECORDED)
def test_whole_output(name, text, content, calls):
    check_whole(name, text, content, calls)


@pytest.mark.parametrize("step", [1, 3, 17])
@pytest.mark.parametrize("name,text,content,calls", RECORDED)
def test_streams_reassemble_to_the_whole_output(name, text, content, calls, step):
    check_stream(name, text, content, calls, step)


@pytest.mark.parametrize("seed", range(4))
def test_random_chunkings_reassemble_to_the_whole_output(seed):
    check_random_chunkings(RECORDED, seed)


def test_every_parser_in_vllms_names_is_here():
    assert {"qwen3_coder", "qwen3_xml", "pythonic", "llama4_pythonic", "deepseek_v3", "deepseek_v31", "kimi_k2",
            "glm45", "granite", "xlam", "phi4_mini_json", "internlm", "jamba", "hunyuan_a13b", "minimax",
            "llama4_json", "seed_oss", "minimax_m2", "longcat", "olmo3", "granite-20b-fc", "step3", "deepseek_v32",
            "ernie45", "gemma4", "mimo", "granite4", "lfm2", "apertus"} <= set(TOOL_PARSERS)


def _request(properties: dict) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": properties}}}])


def test_qwen3_coder_types_parameters_by_the_tool_schema():
    req = _request({"i": {"type": "integer"}, "x": {"type": "number"}, "b": {"type": "boolean"},
                    "s": {"type": "string"}, "o": {"type": "object"}, "a": {"type": "array"},
                    "n": {"anyOf": [{"type": "integer"}, {"type": "null"}]}, "t": {"type": ["integer", "null"]},
                    "bad": {"type": "integer"}, "nil": {"type": "string"}})
    params = {"i": "42", "x": "3.14", "b": "true", "s": "007", "o": '{"k": "v"}', "a": "['p', 1]", "n": "5",
              "t": "6", "bad": "many", "nil": "null", "other": "12"}
    text = "<tool_call>\n<function=f>\n" + "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items()) \
        + "</function>\n</tool_call>"
    _, calls = ToolCallView(get_tool_parser("qwen3_coder", request=req)).final(text)
    assert json.loads(calls[0].function.arguments) == {
        "i": 42, "x": 3.14, "b": True, "s": "007", "o": {"k": "v"}, "a": ["p", 1], "n": 5, "t": 6, "bad": "many",
        "nil": None, "other": "12"}  # not in the schema: the text as written


def test_glm45_keeps_string_parameters_as_written():
    req = _request({"code": {"type": "string"}})
    text = "<tool_call>f\n<arg_key>code</arg_key>\n<arg_value>123</arg_value>\n<arg_key>n</arg_key>\n" \
           "<arg_value>123</arg_value>\n</tool_call>"
    _, calls = ToolCallView(get_tool_parser("glm45", request=req)).final(text)
    assert json.loads(calls[0].function.arguments) == {"code": "123", "n": 123}


def test_streaming_names_a_call_before_its_arguments_are_complete():
    view = ToolCallView(get_tool_parser("qwen3_coder"))
    content, pieces = view.delta("Sure.<tool_call>\n<function=get_current_weather>\n<parameter=ci", final=False)
    assert content == "Sure." and pieces[0].function.name == "get_current_weather"
    assert pieces[0].function.arguments == ""
    assert view.delta("Sure.<tool_call>\n<funct", final=False)[0] == ""
    view = ToolCallView(get_tool_parser("pythonic"))
    _, pieces = view.delta("[get_weather(city='Par", final=False)
    assert pieces[0].function.name == "get_weather"


def test_kimi_k2_keeps_the_models_call_ids():
    text = KIMI[0] + KIMI[1] + "functions.get_time:0" + KIMI[2] + "{}" + KIMI[3] + KIMI[4]
    _, calls = ToolCallView(get_tool_parser("kimi_k2")).final(text)
    _, streamed = _stream(get_tool_parser("kimi_k2"), text, 5)
    assert calls[0].id == streamed[0]["id"] == "functions.get_time:0"


@pytest.mark.parametrize("text", [
    "[f(x=__import__('os').system('echo hi'))]",  # code, not a literal: never run
    "[f(x=open('/etc/passwd'))]", "[f(1, 2)]", "[f(**{'a': 1})]", "[os.system('x')]", "[f(x=1e999)]",
    "[f(x=b'z')]", "[f(x={1, 2})]", "[f(x=1)] and then some text", "[1, 2, 3]", "[]",
])
def test_pythonic_takes_literal_arguments_only(text):
    content, calls = ToolCallView(get_tool_parser("pythonic")).final(text)
    assert calls == [] and content == text


@pytest.mark.parametrize("name,text", [
    ("qwen3_coder", "<tool_call>\n<function=>\n</function>"),
    ("glm45", "<tool_call>f\n<arg_key>a</arg_key>\n</tool_call>"),
    ("deepseek_v31", DS[0] + DS[1] + "f" + DS[2] + "{not json}" + DS[3]),
    ("kimi_k2", KIMI[0] + KIMI[1] + "functions.f" + KIMI[2] + "{}" + KIMI[3]),
    ("granite", '[{"name": "f", "arguments": 3}]'),
    ("jamba", "<tool_calls>[oops]</tool_calls>"),
])
def test_a_malformed_call_is_content(name, text):
    content, calls = ToolCallView(get_tool_parser(name)).final(text)
    assert calls == [] and content == text


ADVERSARIAL = [
    _100kb("<tool_call>", "<function="), _100kb("<tool_call><function=f>", "<parameter="),
    _100kb("<tool_call><function=f><parameter=a>", "</parameter>x"), _100kb("", "<tool_call>f<arg_key>"),
    _100kb("[", "f("), _100kb("[f(x=", "["), _100kb("[f(x='", "\\'"), _100kb("<|python_start|>[", "a(),"),
    _100kb(DS[0], DS[1]), _100kb(DS[0] + DS[1] + "f" + DS[2], "{"), _100kb(KIMI[0], KIMI[1] + "a:0" + KIMI[2]),
    _100kb("<tool_calls>", '[{"name": "f", "arguments": {"a": '), _100kb("```json\n[", '{"name": "'),
    _100kb("", "functools"), _100kb("<|action_start|><|plugin|>", "{"),
    _100kb("<function_calls>", "f()\n"), _100kb("<function_calls>", "f(x=["), _100kb("", "<function_call>{}"),
    _100kb("<minimax:tool_call>", '<invoke name="'), _100kb("<minimax:tool_call><invoke name=f>", "<parameter name="),
    _100kb("<|tool_call>call:f{", "a:{"), _100kb("<|tool_call>call:f{a:", "["), _100kb("<|tool_call>call:f{", "a:1,"),
    _100kb("<|tool_call>call:f{a:", Q), _100kb("", "<|tool_call>call:f{}<tool_call|>"),
    _100kb(STEP3[0], STEP3[1] + '<steptml:invoke name="f">'), _100kb(DSML[0], '<｜DSML｜invoke name="f">'),
    _100kb(DSML[0] + '<｜DSML｜invoke name="f">', '<｜DSML｜parameter name="a" string="false">['),
    _100kb("<|tool_call_start|>[", "f(a=1), "), _100kb("", "<|tool_call_start|>"),
    _100kb("<|tools_prefix|>[", '{"f": {"a": ['), _100kb("<|tools_prefix|>[", '{"f": {}}, '),
]
NEW = sorted({c.name: c for n, c in TOOL_PARSERS.items()
              if n not in ("hermes", "qwen", "llama3_json", "llama4_json", "mistral", "openai")}.values(),
             key=lambda c: c.name)


@pytest.mark.parametrize("parser_cls", NEW, ids=lambda c: c.name)
def test_adversarial_100kb_parses_fast(parser_cls):
    for text in ADVERSARIAL:
        _parses_fast(parser_cls, text)


PYTHONIC_STREAMS = [
    ("pythonic", "[f(a='x\\'y', b=[1, (2, 3)]), g(c={'k': \"v)\"})]"),
    ("llama4_pythonic", "<|python_start|>[f(a=1), g()]<|python_end|>"),
    ("olmo3", "<function_calls>f(a='q\\\\', b=null)\ng(c=true)</function_calls>"),
    ("olmo3", "<function_calls>f(a=1)</function_calls>[f("),  # text after the block
    ("pythonic", "[f(a=1)] and more"),  # not a call list once final
]


@pytest.mark.parametrize("name,text", PYTHONIC_STREAMS)
def test_pythonic_stream_resumes_the_scan_as_a_fresh_parse_reads_it(name, text):
    """A parser fed growing prefixes (it resumes its scan where the previous one stopped) reads
    each prefix, partial or final, as a new parser reading only that prefix does."""
    streamed = get_tool_parser(name)
    for n in range(1, len(text) + 1):
        for final in (False, True) if n == len(text) else (False,):
            assert streamed.parse(text[:n], final) == get_tool_parser(name).parse(text[:n], final), text[:n]


@pytest.mark.parametrize("name,text", [("pythonic", "[f(a='" + "x" * 20_000 + "'), g()]"),
                                       ("olmo3", "<function_calls>f(a='" + "x" * 20_000 + "')\ng()</function_calls>")],
                         ids=["pythonic", "olmo3"])
def test_pythonic_stream_scans_each_character_about_once(name, text, monkeypatch):
    """Streamed in 4-character deltas, the call list is scanned on from where the previous delta
    stopped: about the text's length in all (it was scanned from its start every delta: 10 s of
    the server's event loop for one 20 kB argument); the deltas reassemble to the calls."""
    from tessellm.entrypoints.openai import tool_parsers_pythonic as pythonic

    scanned, run = [], pythonic._Scan._run

    def counting(self, text, i, *state):
        scanned.append(len(text) - i)
        return run(self, text, i, *state)

    monkeypatch.setattr(pythonic._Scan, "_run", counting)
    content, calls = _stream(get_tool_parser(name), text, 4)
    assert content == "" and [c["name"] for c in calls] == ["f", "g"]
    assert json.loads(calls[0]["arguments"]) == {"a": "x" * 20_000}
    assert sum(scanned) < 2 * len(text)


@pytest.mark.parametrize("name,text", [("hermes", '<tool_call>{"name": "", "arguments": {"a": 1}}</tool_call>'),
                                       ("granite", '[{"name": "", "arguments": {}}]'),
                                       ("xlam", '[{"name": "", "arguments": {}}, {"name": "f", "arguments": {}}]')])
def test_an_empty_name_is_never_streamed_as_a_call(name, text):
    """A call object whose name is ``""`` is not a call (the whole output is content); while
    streaming it is not announced as a call with an empty name either (it was, before the
    object was complete)."""
    view, names = ToolCallView(get_tool_parser(name)), []
    for n in range(1, len(text) + 1):
        names += [p.function.name for p in view.delta(text[:n], n == len(text))[1] if p.id is not None]
    assert "" not in names
    assert ToolCallView(get_tool_parser(name)).final(text) == (text, [])


@pytest.mark.parametrize("name,shape", [
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": DEEP}}</tool_call>'),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": DEEP}}]'),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": DEEP}'),
    ("granite", '[{"name": "f", "arguments": {"a": DEEP}}]'),
    ("glm45", "<tool_call>f\n<arg_key>a</arg_key><arg_value>DEEP</arg_value></tool_call>"),
    ("qwen3_coder", "<tool_call><function=f><parameter=a>DEEP</parameter></function></tool_call>"),
], ids=["hermes", "mistral", "mistral-args", "granite", "glm45", "qwen3_coder"])
def test_arguments_nested_near_the_recursion_limit_are_a_call_or_content(name, shape):
    """Arguments nested about as deep as the interpreter's recursion limit allows (every depth
    up to it, wherever the caller's stack stands): JSON that decodes but cannot be encoded
    again is not a call (the whole output content); a RecursionError never escapes (it did: a
    500, or a broken stream)."""
    limit = sys.getrecursionlimit()
    for depth in range(limit - 200, limit + 5):
        text = shape.replace("DEEP", "[" * depth + "]" * depth)
        content, calls = ToolCallView(get_tool_parser(name)).final(text)
        assert [c.function.name for c in calls] == ["f"] or (calls == [] and content == text)


@pytest.mark.parametrize("name,text", [
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"x\\": Infinity}"}</tool_call>'),  # arguments as a string
    ("llama3_json", '{"name": "f", "parameters": {"x": -Infinity}}'),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"x": [1, NaN]}'),
    ("granite", '[{"name": "f", "arguments": {"x": Infinity}}]'),
    ("xlam", '[{"name": "f", "arguments": {"x": NaN}}]'),
    ("deepseek_v31", DS[0] + DS[1] + "f" + DS[2] + '{"x": NaN}' + DS[3] + DS[4]),
    ("kimi_k2", KIMI[0] + KIMI[1] + "functions.f:0" + KIMI[2] + '{"x": NaN}' + KIMI[3] + KIMI[4]),
    ("jamba", '<tool_calls>[{"name": "f", "arguments": {"x": NaN}}]</tool_calls>'),
    ("pythonic", "[f(x=1e999)]"),
])
def test_arguments_that_are_not_strict_json_are_content(name, text):
    """NaN / Infinity are not JSON (a client's JSON.parse refuses them): such a call is not a
    call, its text is content, whole or streamed (a stream may have named the call already:
    it cannot be withdrawn, its arguments never come)."""
    assert ToolCallView(get_tool_parser(name)).final(text) == (text, [])
    content, calls = _stream(get_tool_parser(name), text, 5)
    assert content == text and all(c["arguments"] == "" for c in calls)


def test_a_tagged_parameter_that_is_not_a_finite_number_stays_text():
    """The XML formats read parameter text: ``NaN`` for a number parameter stays the string."""
    req = _request({"x": {"type": "number"}, "y": {"type": "object"}})
    text = "<tool_call>\n<function=f>\n<parameter=x>\nNaN\n</parameter>\n<parameter=y>\n{\"a\": Infinity}\n" \
           "</parameter>\n</function>\n</tool_call>"
    _, calls = ToolCallView(get_tool_parser("qwen3_coder", request=req)).final(text)
    assert json.loads(calls[0].function.arguments) == {"x": "NaN", "y": '{"a": Infinity}'}


def test_gemma4_reads_at_most_max_values_per_output():
    from tessellm.entrypoints.openai.tool_parsers_gemma4 import MAX_VALUES

    def call(n):
        return "<|tool_call>call:f{a:[" + ",".join(["1"] * (n - 2)) + "]}<tool_call|>"

    _, calls = ToolCallView(get_tool_parser("gemma4")).final(call(MAX_VALUES))
    assert len(json.loads(calls[0].function.arguments)["a"]) == MAX_VALUES - 2
    text = call(MAX_VALUES // 2) + call(MAX_VALUES // 2 + 1)  # the budget is the output's
    assert ToolCallView(get_tool_parser("gemma4")).final(text) == (text, [])
    # n > 1: the choices share the parser; the same call at the same place, after calls that
    # left another budget, is read again (it was taken from the first choice's reading)
    parser, few = get_tool_parser("gemma4"), call(MAX_VALUES // 2)
    few = "<|tool_call>call:f{a:" + Q + "x" * (len(few) - 44) + Q + "}<tool_call|>"
    assert len(few) == len(call(MAX_VALUES // 2))
    assert ToolCallView(parser).final(text) == (text, [])
    _, calls = ToolCallView(parser).final(few + call(MAX_VALUES // 2 + 1))
    assert [c.function.name for c in calls] == ["f", "f"]
