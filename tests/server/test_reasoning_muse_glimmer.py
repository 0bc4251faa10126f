"""``--reasoning-parser muse_glimmer`` (tessellm/reasoning/muse_glimmer.py): MuseGlimmer's
recipient channels split into reasoning (``to=self``) and answer (``to=user`` and untagged),
whole and cut at every character (a stream's strings only grow and end where the whole ones
are), where the output starts from the channel the prompt leaves open, and the server's plan
over a real tokenizer with MuseGlimmer's special tokens."""

from __future__ import annotations

import pytest

from tessellm.reasoning.budget import thinking_strings
from tessellm.reasoning.muse_glimmer import TURN, UNTAGGED, GlimmerSplit, initial_recipient
from tests.server.streaming_split import fed_blind, streamed

TOOL = '<atem:function_calls><atem:invoke name="weather.get"></atem:invoke></atem:function_calls>'
SELF_H, USER_H = "to=self<|message|>", "to=user<|message|>"  # one special token each in the served model
OUTPUT = ("to=self<|message|>Look it up first.<|eom|>"
          f"<|start|>assistant to=weather.get<|message|>{TOOL}<|eom|>"
          "<|start|>assistant to=self<|message|>It said sunny.<|eom|>\n"
          "to=user<|message|>It is sunny, to=me at least.<|eot|>")


def test_self_channels_are_the_reasoning_user_channels_the_answer():
    reasoning, answer = GlimmerSplit().split(OUTPUT)
    assert reasoning == "Look it up first.\nIt said sunny."  # vLLM's join; the tool channel in neither
    assert answer == "It is sunny, to=me at least."
    assert streamed(GlimmerSplit(), OUTPUT) == (reasoning, answer)


@pytest.mark.parametrize("text, expected", [
    ("to=self<|message|>thinking to=user<|message|>Hi", ("thinking", "Hi")),  # a budget's forced switch
    ("to=self<|message|>cut off mid", ("cut off mid", "")),
    ("<|message|>untagged answer<|eot|>", (None, "untagged answer")),
    ("plain text, no channel", (None, "plain text, no channel")),
    ("to=self<|message|>a<|eom|>junk between<|start|>assistant<|message|>b", ("a", "b")),
])
def test_edges_whole_andstreamed(text, expected):
    assert GlimmerSplit().split(text) == expected
    assert streamed(GlimmerSplit(), text) == (expected[0] or "", expected[1])


def test_a_stream_reads_each_delta_and_a_bounded_look_back():
    """A long output fed 3 and 7 characters a call, the text more than 64 characters (a marker
    and a header) before the previous call's end blinded: every call equals a fresh split of the
    true prefix, so no call read the settled text again (linear, not quadratic)."""
    text = OUTPUT * 12 + "<|start|>assistant to=self<|message|>open at the end"

    def fresh(prefix, final):
        return GlimmerSplit().split(prefix, [], final)

    for step in (3, 7):
        split = GlimmerSplit()
        last = fed_blind(lambda t, final: split.split(t, [], final), fresh, text, step, 64)
        assert last[0].endswith("It said sunny.\nopen at the end")


def test_a_long_run_of_blanks_is_read_once():
    """Blanks before a header are not the body; the header is read back from its <|message|>
    (the regular expression this replaced tried a match at every blank: 8,000 took seconds)."""
    blanks = " \t" * 100_000
    text = f"to=self<|message|>think{blanks}x{blanks}to=user<|message|>Hi"
    assert GlimmerSplit().split(text) == (f"think{blanks}x", "Hi")
    split = GlimmerSplit()
    assert [split.split(text[:cut], [], False) for cut in (len(text) // 3, len(text))][-1] == (f"think{blanks}x", "Hi")
    assert initial_recipient(f"<|start|>assistant{blanks}to=self<|message|>{blanks}") == "self"


@pytest.mark.parametrize("unit", ["to=", "<|"])
def test_repeated_header_and_marker_starts_are_read_once(unit):
    """Only the last ``to=`` (or ``<|``) may still become a header (a marker): the rest is body
    while streaming (the old hold-back trimmed one after another, holding all of it back in
    quadratic time: 20,000 characters of ``to=`` took 18 s); 20,000 headers in a row are as
    many empty thoughts."""
    body = unit * (60_000 // len(unit))
    assert GlimmerSplit().split(SELF_H + body, [], final=False) == (body[:-len(unit)], "")
    assert GlimmerSplit().split(SELF_H + body) == (body, "")
    assert initial_recipient(TURN + SELF_H + body) == "self"
    assert GlimmerSplit().split(SELF_H * 20_000) == ("\n" * 19_999, "")


def test_the_prompt_open_channel_decides_where_the_output_starts():
    assert initial_recipient("<|start|>user<|message|>hi<|eom|><|start|>assistant") is None
    assert initial_recipient("<|start|>assistant to=self<|message|>") == "self"
    assert initial_recipient("<|start|>assistant<|message|>") == UNTAGGED
    assert initial_recipient("<|start|>assistant to=self<|message|>done<|eom|>") is None
    assert GlimmerSplit("self").split("more thought<|eom|>to=user<|message|>Hi") == ("more thought", "Hi")
    assert streamed(GlimmerSplit("self"), "more thought<|eom|>to=user<|message|>Hi") == ("more thought", "Hi")


def test_thinking_budget_markers():
    assert thinking_strings("muse_glimmer", None) == (("to=self<|message|>",), ("to=user<|message|>",))


def test_the_server_plan_keeps_the_special_tokens_and_reads_the_prompt():
    from tessellm.entrypoints.openai.reasoning import ReasoningPlan, ReasoningStream
    from tessellm.sampling_params import SamplingParams
    from tests.tiny_tokenizer import bpe_tokenizer

    tok = bpe_tokenizer(["abc"], ["<pad>", "<s>", "</s>"], 259, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|message|>", "<|eom|>", "<|eot|>"]})
    prompt = tok.encode("<|start|>user<|message|>hi<|eom|><|start|>assistant to=self<|message|>",
                        add_special_tokens=False)
    plan = ReasoningPlan("muse_glimmer", tok, prompt, include=True)
    params = SamplingParams()
    plan.adjust(params)
    assert params.skip_special_tokens is False  # the framing must reach the split (vLLM's adjust_request)
    out = tok.encode("abc<|eom|>to=user<|message|>cab<|eot|>", add_special_tokens=False)
    text = tok.decode(out, skip_special_tokens=False)
    assert plan.split().split(text, out, True) == ("abc", "cab")
    stream = ReasoningStream(plan)
    fields, answer = stream.delta(text, out, True)
    assert fields["reasoning"] == "abc" and answer == "cab"


# -- end to end ---------------------------------------------------------------------------------

CHAINS = {"[glim]": [SELF_H, " Look", " it", " up.", "<|eom|>", USER_H, " Sunny.", "<|eot|>", "</s>"]}


@pytest.fixture(scope="module")
def srv(server_factory, tmp_path_factory):
    from tests.server.thinking_model import make_thinking_model

    model = make_thinking_model(str(tmp_path_factory.mktemp("glimmer")), special_markers=True,
                                markers=(SELF_H, USER_H), chains=CHAINS)
    return server_factory([model, "--served-model-name", "m", "--reasoning-parser", "muse_glimmer"])


def _chat(srv, **body):
    import httpx

    body = {"model": "m", "messages": [{"role": "user", "content": "[glim]"}], "max_tokens": 20,
            "temperature": 0, **body}
    if not body.get("stream"):
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=srv.headers, timeout=120)
        assert r.status_code == 200, r.text
        m = r.json()["choices"][0]["message"]
        return m.get("reasoning"), m.get("content")
    reasoning, content = [], []
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, headers=srv.headers, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in httpx.Response(200, content=line[6:]).json()["choices"]:
                    reasoning.append(choice["delta"].get("reasoning") or "")
                    content.append(choice["delta"].get("content") or "")
    return "".join(reasoning), "".join(content)


def test_muse_glimmer_served_whole_streamed_and_with_a_budget(srv):
    """The special-token framing reaches the split (skip_special_tokens off); a budget of 1 lets
    one thinking token through, then forces to=user<|message|> and the model answers on."""
    assert _chat(srv) == (" Look it up.", " Sunny.")
    assert _chat(srv, stream=True) == (" Look it up.", " Sunny.")
    assert _chat(srv, thinking_token_budget=1) == (" Look", " Sunny.")
