"""vLLM's other reasoning parsers on outputs shaped as their models write them: the whole
output's split, and the same output streamed one character at a time (every cut a marker can
be split at) through one ``ReasoningSplit``: each piece sent is a prefix of the whole split's,
so no marker or envelope piece ever leaks, and the last call equals the whole split."""

from __future__ import annotations

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
    assert markers.end_id == 7
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


def test_every_vllm_name_is_known():
    assert {"deepseek_r1", "deepseek_v3", "ernie45", "glm45", "glm47", "mimo", "granite", "holo2", "hunyuan_a13b", "kimi_k2",
            "minimax_m2", "minimax_m2_append_think", "mistral", "olmo3", "openai_gptoss", "qwen3", "seed_oss",
            "step3", "step3p5"} == set(REASONING_PARSERS)


def test_the_phase_the_server_sends_the_engine_core_is_checked():
    from tessellm.sampling_params import SamplingParams

    assert SamplingParams(reasoning_phase=ANSWER).reasoning_phase == "answer"
    with pytest.raises(ValueError, match="reasoning_phase must be reasoning, answer or undecided"):
        SamplingParams(reasoning_phase="maybe")
