"""``--reasoning-parser inkling`` (tessellm/reasoning/inkling.py): Inkling's typed blocks split
into reasoning (the thinking blocks) and answer, whole and cut at every character (a stream's
strings only grow and end where the whole ones are), with the ``inkling`` tool parser reading
the blocks the split leaves, where the output starts from the prompt's last marker, and end to
end on a server over a tiny bigram model that writes Inkling's blocks (with a thinking budget
that forces ``<|end_message|>``)."""

from __future__ import annotations

import httpx
import pytest

from tessellm.entrypoints.openai.tool_parsers_inkling import InklingParser
from tessellm.reasoning.budget import thinking_strings
from tessellm.reasoning.inkling import CONTENT, HEADER, LONGEST, THINKING, InklingSplit, initial_state
from tests.server.streaming_split import fed_blind, streamed
from tests.server.thinking_model import make_thinking_model

M, THINK, TEXT, CALL, END = ("<|message_model|>", "<|content_thinking|>", "<|content_text|>",
                             "<|content_invoke_tool_json|>", "<|end_message|>")
OUTPUT = (f"{THINK}I should look it up. \n{END}{M}{TEXT}Let me check.{END}"
          f'{M}get_weather{CALL}{{"name": "get_weather", "args": {{"city": "SF"}}}}{END}'
          f"{M}{THINK}Then answer.{END}{M}{TEXT} Done.<|content_model_end_sampling|>")


def test_thinking_blocks_are_the_reasoning_text_blocks_the_answer():
    reasoning, answer = InklingSplit(HEADER).split(OUTPUT)
    assert reasoning == "I should look it up.Then answer."  # each block less its trailing whitespace
    assert answer == 'Let me check.{"name": "get_weather", "args": {"city": "SF"}} Done.'
    assert streamed(InklingSplit(HEADER), OUTPUT) == (reasoning, answer)


def test_the_tool_parser_reads_the_blocks_the_split_leaves():
    reasoning, answer = InklingSplit(HEADER, keep_blocks=True).split(OUTPUT)
    assert THINK not in answer and reasoning == "I should look it up.Then answer."
    parsed = InklingParser().parse(answer, final=True)
    assert parsed.content == "Let me check. Done."
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", '{"city": "SF"}')]
    assert streamed(InklingSplit(HEADER, keep_blocks=True), OUTPUT) == (reasoning, answer)


@pytest.mark.parametrize("keep_blocks", [False, True])
def test_a_stream_reads_each_delta_and_a_markers_length_back(keep_blocks):
    """A long output fed 3 and 7 characters a call, the text more than two markers' length
    before the previous call's end blinded: every call equals a fresh split of the true prefix,
    so no call read the settled text again (the split is linear, not quadratic, in the output)."""
    text = OUTPUT * 12 + f"{M}{THINK}open at the end \n"
    window = 2 * LONGEST

    def fresh(prefix, final):
        return InklingSplit(HEADER, keep_blocks).split(prefix, [], final)

    for step in (3, 7):
        split = InklingSplit(HEADER, keep_blocks)
        last = fed_blind(lambda t, final: split.split(t, [], final), fresh, text, step, window)
        assert last[0] == "I should look it up.Then answer." * 12 + "open at the end"


def _calls(result):
    return result.content, [(c.name, c.arguments) for c in result.calls]


def test_the_tool_parser_reads_each_delta_and_a_markers_length_back():
    """The inkling tool parser streamed blind as the split above: every call equals a fresh
    parse of the true prefix (an open call's name included), so a call's JSON is read from the
    parser's own copy of the block, not from the settled text; the last is the whole parse."""
    block = (f'{M}get_weather{CALL}{{"name": "get_weather", "args": {{"city": "SF"}}}}{END}'
             f"{M}{TEXT}Let me check.{END}{M}{THINK}hmm{END}")
    text = block * 12 + f'{M}{CALL}{{"args": {{"n": "{"x" * 200}"}}, "name": "f"}}'

    def fresh(prefix, final):
        return _calls(InklingParser().parse(prefix, final))

    for step in (3, 7):
        parser = InklingParser()
        content, calls = fed_blind(lambda t, final: _calls(parser.parse(t, final)), fresh, text, step, 2 * LONGEST)
        assert content == "Let me check." * 12 and calls[-1] == ("f", '{"n": "' + "x" * 200 + '"}')
        assert calls[:-1] == [("get_weather", '{"city": "SF"}')] * 12


def test_each_choice_has_a_tool_parser_of_its_own():
    """n > 1: the views of one request get parsers of their own (the parser keeps its stream's
    state). Two outputs of one length that end alike, streamed in turns: each gets its own
    calls (one shared parser took the second for the first grown: the same characters where
    it checks)."""
    from tessellm.entrypoints.openai.protocol import ChatCompletionRequest
    from tessellm.entrypoints.openai.tools import ToolPlan

    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice="auto")
    plan = ToolPlan(req, "inkling")
    views = [plan.view(), plan.view()]
    assert views[0].parser is not views[1].parser
    tail = f"{M}{TEXT}" + "same words, " * 10 + END
    texts = [f'{CALL}{{"name": "f"}}{END}' + tail, f"{TEXT}hello there, world.......{END}" + tail]
    assert len(texts[0]) == len(texts[1])
    got = [[], []]
    for cut in range(4, len(texts[0]) + 4, 4):
        for i in (0, 1):
            content, pieces = views[i].delta(texts[i][:cut], final=cut >= len(texts[i]))
            got[i].append((content, [p.function.name for p in pieces if p.function.name]))
    assert "".join(c for c, _ in got[0]) == "same words, " * 10
    assert [n for _, names in got[0] for n in names] == ["f"]
    assert "".join(c for c, _ in got[1]) == "hello there, world......." + "same words, " * 10
    assert [n for _, names in got[1] for n in names] == []


def test_where_the_output_starts_and_edge_blocks():
    assert initial_state(f"{M}{TEXT}hi{END}{M}") == HEADER
    assert initial_state(f"{M}{THINK}partial thought") == THINKING
    assert initial_state(f"{M}{TEXT}") == CONTENT
    assert InklingSplit(THINKING).split(f"more thought {END}{M}{TEXT}Hi") == ("more thought", "Hi")
    assert InklingSplit(CONTENT).split("Hi there") == (None, "Hi there")
    assert InklingSplit(HEADER).split(f"{TEXT}  {END}") == (None, "")  # only whitespace: none
    # a thinking block left open ends at a tool block; a second thinking marker inside is dropped
    text = f'{THINK}a{THINK}b{CALL}{{"name": "f"}}{END}'
    assert InklingSplit(HEADER).split(text) == ("ab", '{"name": "f"}')
    kept = InklingSplit(HEADER, keep_blocks=True).split(text)[1]
    assert [c.name for c in InklingParser().parse(kept, final=True).calls] == ["f"]
    # cut off inside the thinking: all reasoning, no answer
    assert InklingSplit(HEADER).split(f"{THINK}still going", final=True) == ("still going", "")


def test_thinking_budget_markers():
    assert thinking_strings("inkling", None) == ((THINK,), (END, "<|content_model_end_sampling|>"))


# -- end to end ---------------------------------------------------------------------------------

SAMPLING_END = "<|content_model_end_sampling|>"
CALL_JSON = '{"name": "get_weather", "args": {"city": "SF"}}'
CHAINS = {"[ink]": [THINK, " Look", " it", " up.", END, M, TEXT, " Sunny.", SAMPLING_END, "</s>"],
          "[call]": [CALL, CALL_JSON, SAMPLING_END]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def srv(server_factory, tmp_path_factory):
    model = make_thinking_model(str(tmp_path_factory.mktemp("inkling")), special_markers=True,
                                markers=(THINK, END), chains=CHAINS)
    return server_factory([model, "--served-model-name", "m", "--reasoning-parser", "inkling",
                           "--enable-auto-tool-choice", "--tool-call-parser", "inkling"])


def _message(srv, trigger="[ink]", **body):
    body = {"model": "m", "messages": [{"role": "user", "content": trigger}], "max_tokens": 20,
            "temperature": 0, **body}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=srv.headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]


def test_inkling_served_whole_streamed_and_with_a_budget(srv):
    m = _message(srv)
    assert (m["reasoning"], m["reasoning_content"], m["content"]) == (" Look it up.", " Look it up.", " Sunny.")
    body = {"model": "m", "messages": [{"role": "user", "content": "[ink]"}], "max_tokens": 20,
            "temperature": 0, "stream": True}
    reasoning, content = [], []
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, headers=srv.headers,
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in httpx.Response(200, content=line[6:]).json()["choices"]:
                    reasoning.append(choice["delta"].get("reasoning") or "")
                    content.append(choice["delta"].get("content") or "")
    assert ("".join(reasoning), "".join(content)) == (" Look it up.", " Sunny.")
    # a budget of 1: one thinking token, then <|end_message|> forced; the model goes on
    m = _message(srv, thinking_token_budget=1)
    assert (m["reasoning"], m["content"]) == (" Look", " Sunny.")


def test_inkling_tool_blocks_reach_the_inkling_tool_parser(srv):
    """With tools the split leaves the blocks in the answer, so the JSON block is a call; the
    thinking stays reasoning."""
    m = _message(srv, "[call]", tools=TOOLS)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]] == [
        ("get_weather", '{"city": "SF"}')]
    assert not m.get("content") and m.get("reasoning") is None
    m = _message(srv, tools=TOOLS)
    assert (m["reasoning"], m["content"], m.get("tool_calls") or []) == (" Look it up.", " Sunny.", [])
