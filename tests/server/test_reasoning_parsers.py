"""vLLM's other reasoning parsers on outputs shaped as their models write them: the whole
output's split, and the same output streamed one character at a time (every cut a marker can
be split at) through one ``ReasoningSplit``: each piece sent is a prefix of the whole split's,
so no marker or envelope piece ever leaks, and the last call equals the whole split."""

from __future__ import annotations

import random

import pytest

from tessellm.reasoning import ANSWER, REASONING, UNDECIDED, ReasoningSplit, ThinkMarkers, get_reasoning_parser
from tessellm.reasoning.parsers import REASONING_PARSERS


class CharTokenizer:
    """One token per character: every marker spans tokens, so the text decides (granite's,
    Hunyuan's and Olmo 3's markers are plain text in their vocabularies)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


CASES = [  # parser, phase, output, (reasoning, answer)
    ("deepseek_v3", REASONING, "<think>Add them.</think>4", ("Add them.", "4")),
    ("deepseek_v3", ANSWER, "<think>Add them.</think>4", (None, "<think>Add them.</think>4")),
    ("holo2", REASONING, "Add them.</think>4", ("Add them.", "4")),
    ("ernie45", REASONING, "Add them.\n</think>\n\n<response>\nIt is 4.\n</response>\n",
     ("Add them.\n", "\nIt is 4.\n")),
    ("ernie45", REASONING, "Add them.\n</think>\nIt is 4.", ("Add them.\n", "\nIt is 4.")),
    ("ernie45", REASONING, "Add them. <resp", ("Add them. <resp", "")),
    ("glm45", REASONING, "<think>Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("glm47", ANSWER, "It is 4.", (None, "It is 4.")),
    ("mimo", UNDECIDED, "It is 4.", (None, "It is 4.")),
    ("granite", UNDECIDED, "Here is my thought process:\nAdd them.\nHere is my response:\nIt is 4.",
     ("\nAdd them.\n", "\nIt is 4.")),
    ("granite", UNDECIDED, "Here's my thought process: Add. Here's my response: 4", (" Add. ", " 4")),
    ("granite", UNDECIDED, "Here it is: 4", (None, "Here it is: 4")),
    ("granite", UNDECIDED, "Here is my thought process: still going",
     (" still going", "")),
    ("hunyuan_a13b", UNDECIDED, "<think>\nAdd them.\n</think>\n<answer>\nIt is 4.\n</answer>",
     ("Add them.", "It is 4.")),
    ("hunyuan_a13b", UNDECIDED, "<think>\n\n</think>\n<answer>\nIt is 4.\n</answer>", ("", "It is 4.")),
    ("hunyuan_a13b", UNDECIDED, "<answer>\nIt is 4.\n</answer>", (None, "<answer>\nIt is 4.")),
    ("kimi_k2", REASONING, "<think>Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("kimi_k2", REASONING, "Call it.<|tool_calls_section_begin|><|tool_call_begin|>",
     ("Call it.", "<|tool_calls_section_begin|><|tool_call_begin|>")),
    ("kimi_k2", REASONING, "Call it.<|tool_calls_sec", ("Call it.<|tool_calls_sec", "")),
    ("minimax_m2", REASONING, "Add them.</think>\n\nIt is 4.", ("Add them.", "\n\nIt is 4.")),
    ("minimax_m2_append_think", REASONING, "Add them.</think>\n\nIt is 4.",
     (None, "<think>Add them.</think>\n\nIt is 4.")),
    ("mistral", UNDECIDED, "[THINK]Add them.[/THINK]It is 4.", ("Add them.", "It is 4.")),
    ("mistral", UNDECIDED, "It is 4.", (None, "It is 4.")),
    ("olmo3", REASONING, "<think>Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("olmo3", REASONING, "Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("seed_oss", REASONING, "<seed:think>Add them.</seed:think>It is 4.", ("Add them.", "It is 4.")),
    ("seed_oss", REASONING, "Add them. Still</seed:thi", ("Add them. Still</seed:thi", "")),
    ("step3", REASONING, "Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("step3p5", REASONING, "<think>Add them.\n\n</think>\n\nIt is 4.", ("Add them.\n", "\nIt is 4.")),
    ("step3p5", REASONING, "Add them.</think>It is 4.\n", ("Add them.", "It is 4.\n")),
    ("step3p5", REASONING, "Add them.\nStill\n", ("Add them.\nStill\n", "")),
    # session 29's: vLLM's parsers added since
    ("cohere_command3", UNDECIDED, "<|START_THINKING|>Add them.<|END_THINKING|>\n<|START_RESPONSE|>It is 4."
     "<|END_RESPONSE|>", ("Add them.", "It is 4.")),
    ("cohere_command4", UNDECIDED, "<|START_THINKING|>Call foo.<|END_THINKING|><|START_ACTION|>\n[{}]\n"
     "<|END_ACTION|>", ("Call foo.", "<|START_ACTION|>\n[{}]\n<|END_ACTION|>")),
    ("cohere_command4", UNDECIDED, "<|START_RESPONSE|>It is 4.<|END_RESPONSE|>", (None, "It is 4.")),
    ("deepseek_v4", REASONING, "Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("deepseek_v4", REASONING, 'Call it.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">',
     ("Call it.\n\n", '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">')),
    ("gemma4", UNDECIDED, "<|channel>thought\nAdd them.<channel|>It is 4.", ("Add them.", "It is 4.")),
    ("gemma4", UNDECIDED, "<|channel>thought\n<channel|>It is 4.", ("", "It is 4.")),
    ("gemma4", UNDECIDED, "<|channel>thought\nCall it.<|tool_call>call:f{}<tool_call|>",
     ("Call it.", "<|tool_call>call:f{}<tool_call|>")),
    ("gemma4", UNDECIDED, "<|channel>though", ("though", "")),  # cut off inside the label: kept
    ("gemma4", UNDECIDED, "<|channel>thinking hard", ("thinking hard", "")),  # no label
    ("gemma4", UNDECIDED, "It is 4.", (None, "It is 4.")),
    ("hy_v3", REASONING, "Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("hy_v3", ANSWER, "It is 4.", (None, "It is 4.")),
    ("hy_v4", REASONING, "<think>Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("kimi_k3", UNDECIDED, "<|open|>think<|sep|>Add them.<|close|>think<|sep|><|open|>response<|sep|>4",
     ("Add them.", "<|open|>response<|sep|>4")),
    ("kimi_k3", REASONING, "Add them.<|close|>think<|sep|>4", ("Add them.", "4")),
    ("kimi_k3", UNDECIDED, "<|open|>response<|sep|>4", (None, "<|open|>response<|sep|>4")),
    ("ling3", REASONING, "Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("ling3", REASONING, "Call it.<tool_call>f", ("Call it.", "<tool_call>f")),
    ("minimax_m3", UNDECIDED, "<mm:think>Add them.</mm:think>It is 4.", ("Add them.", "It is 4.")),
    ("minimax_m3", UNDECIDED, "It is 4.", (None, "It is 4.")),
    ("nemotron_v3", REASONING, "Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("nemotron_v3", REASONING, "Call it.<tool_call>", ("Call it.", "<tool_call>")),
    ("poolside_v1", REASONING, "<think>Add them.</think>4", ("Add them.", "4")),
]


@pytest.mark.parametrize("name,phase,text,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_whole_and_streamed_split(name, phase, text, expected):
    markers = ThinkMarkers.from_tokenizer(get_reasoning_parser(name), CharTokenizer())
    whole = ReasoningSplit(markers, phase).split(text, [], final=True)
    assert whole == expected
    stream = ReasoningSplit(markers, phase)
    for cut in range(len(text) + 1):
        reasoning, answer = stream.split(text[:cut], [], final=cut == len(text))
        assert (expected[0] or "").startswith(reasoning or "") and expected[1].startswith(answer), cut
    assert (reasoning, answer) == whole


def test_single_token_end_needs_its_id():
    """A one-token end marker ends the thinking only as that token, as for deepseek_r1."""
    class Tok(CharTokenizer):
        def encode(self, text, add_special_tokens=False):
            return [7] if text == "</seed:think>" else super().encode(text)

    markers = ThinkMarkers.from_tokenizer(get_reasoning_parser("seed_oss"), Tok())
    assert markers.end_token_ids == {7: "</seed:think>"}
    text = "Add.</seed:think>4"
    assert ReasoningSplit(markers, REASONING).split(text, [1, 7, 2], final=True) == ("Add.", "4")
    assert ReasoningSplit(markers, REASONING).split(text, [1, 2, 3], final=True) == (text, "")


def test_prompt_and_thinking_switch_decide_where_the_output_starts():
    v3, holo2 = get_reasoning_parser("deepseek_v3"), get_reasoning_parser("holo2")
    assert v3.thinking(None) is False and v3.thinking({"thinking": True}) is True
    assert v3.thinking({"enable_thinking": True}) is True and holo2.thinking({}) is True
    assert holo2.thinking({"thinking": False}) is False
    glm = get_reasoning_parser("glm45")
    assert glm.thinking({"enable_thinking": False}) is False and glm.thinking(None) is True
    assert get_reasoning_parser("glm47").initial_phase("<|assistant|>", False) == ANSWER
    kimi = get_reasoning_parser("kimi_k2")
    assert kimi.thinking({}) is True and kimi.thinking({"thinking": False}) is False
    assert kimi.thinking({"enable_thinking": False}) is True  # Kimi reads ``thinking`` only
    assert get_reasoning_parser("seed_oss").thinking({"thinking": True}) is None  # not its switch
    # DeepSeek-V3.1's template: "<｜Assistant｜><think>" thinking, "<｜Assistant｜></think>" not.
    assert v3.initial_phase("<｜Assistant｜><think>", True) == REASONING
    assert v3.initial_phase("<｜Assistant｜></think>", False) == ANSWER
    assert v3.initial_phase("<｜Assistant｜>", False) == ANSWER  # the switch alone
    assert v3.initial_phase("<｜Assistant｜>", True) == REASONING
    assert v3.initial_phase("<｜Assistant｜>") == UNDECIDED  # the engine core: the output tells
    granite = get_reasoning_parser("granite")
    system = ("Write your thoughts after 'Here is my thought process:' and write your response after "
              "'Here is my response:' for each user query.<|end_of_text|>\n<|start_of_role|>assistant"
              "<|end_of_role|>")
    assert granite.initial_phase(system) == UNDECIDED  # the instructions name the markers mid-text
    assert get_reasoning_parser("mistral").initial_phase("[THINK]Your thoughts[/THINK]Here, a response."
                                                         "[/SYSTEM_PROMPT][INST]hi[/INST]") == UNDECIDED
    assert get_reasoning_parser("glm45").initial_phase("<|assistant|><think></think>\n") == ANSWER


def test_the_switches_of_the_parsers_added_since():
    hy_v3, hy_v4 = get_reasoning_parser("hy_v3"), get_reasoning_parser("hy_v4")
    assert hy_v3.thinking(None) is False and hy_v3.thinking({"reasoning_effort": "high"}) is True
    assert hy_v3.thinking({"reasoning_effort": "no_think"}) is False
    assert hy_v4.thinking({}) is True and hy_v4.thinking({"reasoning_effort": "no_think"}) is False
    for name in ("deepseek_v4", "kimi_k3", "ling3"):
        parser = get_reasoning_parser(name)
        assert parser.thinking({}) is True, name
        assert parser.thinking({"thinking": False}) is parser.thinking({"enable_thinking": False}) is False, name
    nemotron = get_reasoning_parser("nemotron_v3")
    assert nemotron.thinking(None) is True and nemotron.thinking({"enable_thinking": False}) is False
    assert nemotron.initial_phase("<|im_start|>assistant\n", False) == ANSWER
    assert get_reasoning_parser("poolside_v1").thinking(None) is False
    # Kimi K3's template opens the think channel as the generation prefix: the output starts inside it
    assert get_reasoning_parser("kimi_k3").initial_phase("<|open|>assistant<|sep|><|open|>think<|sep|>",
                                                         True) == REASONING
    assert get_reasoning_parser("gemma4").initial_phase("<|turn>model\n") == UNDECIDED
    assert get_reasoning_parser("minimax_m3").initial_phase("]~b]ai\n<mm:think>") == REASONING


def test_a_label_is_held_until_it_is_told_apart():
    """Gemma 4's "thought\n": each streamed reasoning is a prefix of the whole one."""
    markers = ThinkMarkers.from_tokenizer(get_reasoning_parser("gemma4"), CharTokenizer())
    split = ReasoningSplit(markers, UNDECIDED)
    seen = [split.split(text, [], final=False)[0] for text in
            ("<|channel>", "<|channel>tho", "<|channel>thought\n", "<|channel>thought\nA", "<|channel>thx")]
    assert seen == ["", "", "", "A", "thx"]  # the last: another output (the split starts over)


def test_every_vllm_name_is_known():
    """vLLM's ReasoningParserManager names (vllm/frontend/processing/reasoning/__init__.py, late
    2026)."""
    assert {"deepseek_r1", "deepseek_v3", "ernie45", "glm45", "glm47", "mimo", "granite", "holo2", "hunyuan_a13b", "kimi_k2",
            "inkling", "minimax_m2", "minimax_m2_append_think", "mistral", "olmo3", "openai_gptoss", "qwen3", "seed_oss",
            "step3", "step3p5", "cohere_command3", "cohere_command4", "deepseek_v4", "gemma4", "hy_v3", "hy_v4",
            "kimi_k3", "ling3", "minimax_m3", "muse_glimmer", "nemotron_v3", "poolside_v1"} == set(REASONING_PARSERS)


def test_the_phase_the_server_sends_the_engine_core_is_checked():
    from tessellm.sampling_params import SamplingParams

    assert SamplingParams(reasoning_phase=ANSWER).reasoning_phase == "answer"
    with pytest.raises(ValueError, match="reasoning_phase must be reasoning, answer or undecided"):
        SamplingParams(reasoning_phase="maybe")


STRAYS = [  # vLLM's parser engine drops a start marker inside the thinking, an end marker in the answer
    ("qwen3", REASONING, "<think>Add<think> them.</think>It is</think> 4.", ("Add them.", "It is 4.")),
    ("qwen3", REASONING, "Add them.<think></think>\n</think>It is 4.", ("Add them.", "\nIt is 4.")),
    ("qwen3", REASONING, "Call it.<tool_call>f</think>", ("Call it.", "<tool_call>f")),
    ("mimo", REASONING, "Add<think> them.</think>4", ("Add them.", "4")),
    ("nemotron_v3", REASONING, "Add<think> them.</think></think>4", ("Add them.", "4")),
    ("seed_oss", REASONING, "A<seed:think>dd.</seed:think>4</seed:think>", ("Add.", "4")),
    ("glm45", REASONING, "<think>Add<think>.</think>4</think>!", ("Add.", "4!")),
    ("glm47", REASONING, "Add<think>.</think>4</think>", ("Add.", "4")),
    ("ling3", REASONING, "Add<think>.</think>4</think>", ("Add.", "4")),
    ("kimi_k2", REASONING, "Add<think>.</think>4</think>", ("Add.", "4")),
    ("deepseek_v4", REASONING, "Add<think>.</think>4</think>", ("Add.", "4")),
    ("gemma4", UNDECIDED, "<|channel>thought\nAdd<|channel>.<channel|>4<channel|>", ("Add.", "4")),
    ("mistral", UNDECIDED, "[THINK]Add[THINK].[/THINK]4[/THINK]", ("Add.", "4")),
    ("qwen3", REASONING, "Add <thin and more", ("Add <thin and more", "")),  # not a marker: kept
    # no thinking in the output: nothing is stray
    ("mistral", UNDECIDED, "It is[/THINK] 4.", (None, "It is[/THINK] 4.")),
    ("qwen3", ANSWER, "It is</think> 4.", (None, "It is</think> 4.")),
    # the parsers vLLM does not run through its engine keep them as text
    ("deepseek_r1", REASONING, "Add<think>.</think>4</think>", ("Add<think>.", "4</think>")),
    ("olmo3", REASONING, "Add<think>.</think>4</think>", ("Add<think>.", "4</think>")),
]


@pytest.mark.parametrize("name,phase,text,expected", STRAYS, ids=[f"{c[0]}-{i}" for i, c in enumerate(STRAYS)])
def test_stray_markers_whole_and_streamed(name, phase, text, expected):
    test_whole_and_streamed_split(name, phase, text, expected)


@pytest.mark.parametrize("seed", range(6))
def test_stray_markers_random_chunkings(seed):
    """Each STRAYS output cut at random places: each call's strings are prefixes of the whole
    split's, and the last call equals it."""
    rng = random.Random(seed)
    for name, phase, text, expected in STRAYS:
        markers = ThinkMarkers.from_tokenizer(get_reasoning_parser(name), CharTokenizer())
        split = ReasoningSplit(markers, phase)
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(8, len(text) - 1)))) + [len(text)]
        for cut in cuts:
            reasoning, answer = split.split(text[:cut], [], final=cut == len(text))
            assert (expected[0] or "").startswith(reasoning or "") and expected[1].startswith(answer), (name, cut)
        assert (reasoning, answer) == expected, (name, cuts)


class MarkerTokenizer(CharTokenizer):
    """Each of ``markers`` one token (as Qwen3's ``<think>`` and ``</think>`` are), the rest a
    token per character."""

    def __init__(self, markers):
        self.ids = {m: 1_000_000 + i for i, m in enumerate(markers)}
        self.texts = {i: m for m, i in self.ids.items()}

    def encode(self, text, add_special_tokens=False):
        ids, pos = [], 0
        while pos < len(text):
            marker = next((m for m in self.ids if text.startswith(m, pos)), None)
            ids.append(self.ids[marker] if marker else ord(text[pos]))
            pos += len(marker) if marker else 1
        return ids

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.texts.get(i) or chr(i) for i in ids)


@pytest.mark.parametrize("name,text,expected", [
    ("qwen3", "<think>Add<think> them.</think>It is</think> 4.", ("Add them.", "It is 4.")),
    ("qwen3", "Add.<think></think><tool_call>f</think>", ("Add.", "<tool_call>f")),
    ("seed_oss", "A<seed:think>dd.</seed:think>4</seed:think>", ("Add.", "4")),
    ("kimi_k2", "Add<think>.</think>4</think>", ("Add.", "4")),
])
def test_stray_markers_token_by_token(name, text, expected):
    """Single-token markers (the ids decide where the thinking ends): fed one token at a time,
    the stray ones never reach either field and the last call equals the whole split."""
    parser = get_reasoning_parser(name)
    tok = MarkerTokenizer((*parser.starts, *parser.ends))
    markers = ThinkMarkers.from_tokenizer(parser, tok)
    assert markers.end_token_ids is not None
    ids = tok.encode(text)
    assert ReasoningSplit(markers, REASONING).split(text, ids, final=True) == expected
    split = ReasoningSplit(markers, REASONING)
    for n in range(1, len(ids) + 1):
        reasoning, answer = split.split(tok.decode(ids[:n]), ids[:n], final=n == len(ids))
        assert expected[0].startswith(reasoning) and expected[1].startswith(answer), n
    assert (reasoning, answer) == expected


def test_stray_markers_streamed_search_each_character_about_once(monkeypatch):
    """A long thinking with strays, streamed 4 characters a call: each call searches only the
    text after what earlier calls settled (the longest marker's length back, plus the new
    characters), not the whole output; the last call equals the whole split."""
    from tessellm.reasoning import split as split_module

    searched, starts_over = [], []  # characters each call had left to search; start-overs
    call, reset = split_module._Strays.__call__, split_module._Strays.reset

    def counted(self, text, complete):
        searched.append(len(text) - self.pos)
        return call(self, text, complete)

    def counted_reset(self):
        starts_over.append(self)
        reset(self)

    monkeypatch.setattr(split_module._Strays, "__call__", counted)
    monkeypatch.setattr(split_module._Strays, "reset", counted_reset)
    text = "step <think>" * 400 + "done</think>" + "ans</think>wer " * 300
    markers = ThinkMarkers.from_tokenizer(get_reasoning_parser("qwen3"), CharTokenizer())
    split = ReasoningSplit(markers, REASONING)
    for cut in range(4, len(text) + 4, 4):
        out = split.split(text[:cut], [], final=cut >= len(text))
    assert len(starts_over) == 2  # each of the two made once, never started over
    assert max(searched) <= 4 + len("</think>") and sum(searched) < 3 * len(text), max(searched)
    assert out == ReasoningSplit(markers, REASONING).split(text, [], final=True) == ("step " * 400 + "done", "answer " * 300)
