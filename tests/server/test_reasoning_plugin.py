"""``--reasoning-parser-plugin``: loading a file of vLLM-style parsers (``reasoning_plugin.py``),
the errors a bad one gets, the adapter a stream goes through, and the grammar gate driven by
the plugin's ``is_reasoning_end``. End to end: ``test_reasoning_families.py::test_plugin_parser``."""

from __future__ import annotations

import os

import pytest
from tests.ids_walks import CountedIds

from tessellm.reasoning import get_reasoning_parser
from tessellm.reasoning.plugins import (DeltaMessage, PluginParser, PluginSplit, ReasoningParser,
                                       ReasoningParserManager, load_plugin)
from tessellm.structured_output.reasoning import PluginGate

PLUGIN = os.path.join(os.path.dirname(__file__), "reasoning_plugin.py")
VOCAB = {"<think>": 1, "</think>": 2, "<seed:think>": 3, "</seed:think>": 4}


class Tokenizer:
    def get_vocab(self):
        return dict(VOCAB)


def test_a_plugin_registers_its_names_and_wins_the_lookup():
    found = load_plugin(PLUGIN)
    assert sorted(found) == ["seed_tags", "think_tags", "think_tags_too"]
    assert found["think_tags"] is found["think_tags_too"]
    parser = get_reasoning_parser("think_tags", PLUGIN)
    assert isinstance(parser, PluginParser) and not parser.harmony and parser.house(Tokenizer()) is None
    house = get_reasoning_parser("seed_tags", PLUGIN).house(Tokenizer())
    assert (house.start, house.end, house.implicit_start) == ("<seed:think>", "</seed:think>", True)
    assert get_reasoning_parser("qwen3", PLUGIN).name == "qwen3"  # built-ins stay
    with pytest.raises(ValueError, match="'think_tags'; choose one of cohere_command3.*--reasoning-parser-plugin"):
        get_reasoning_parser("think_tags")  # without the file, unknown


def test_a_bad_plugin_file_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_plugin(str(tmp_path / "missing.py"))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="registers no reasoning parser.*register_module"):
        load_plugin(str(empty))
    broken = tmp_path / "broken.py"
    broken.write_text("from vllm.reasoning import ReasoningParser\n")
    with pytest.raises(ValueError, match="broken.py.*failed to load: ModuleNotFoundError"):
        load_plugin(str(broken))
    with pytest.raises(TypeError, match="subclass of tessellm.reasoning.plugins.ReasoningParser"):
        ReasoningParserManager.register_module("x")(int)


def _stream(split, pieces, ids):
    text, got = "", []
    for i, (piece, token) in enumerate(zip(pieces, ids)):
        text += piece
        got.append(split.split(text, ids[:i + 1], final=i == len(ids) - 1))
    return got


def test_the_adapter_adds_up_a_streaming_parsers_deltas():
    cls = load_plugin(PLUGIN)["think_tags"]
    pieces = ["<think>", " Add", " them.", "</think>", " Four", "."]
    ids = [1, 10, 11, 2, 12, 13]
    got = _stream(PluginSplit(cls(Tokenizer()), request=None), pieces, ids)
    assert got[0] == (None, "") and got[3] == (" Add them.", "")
    assert got[-1] == (" Add them.", " Four.")
    whole = PluginSplit(cls(Tokenizer()), request=None).split("".join(pieces), ids, final=True)
    assert whole == got[-1]
    parser = get_reasoning_parser("think_tags", PLUGIN).instance(Tokenizer(), {"thinking": True})
    assert parser.chat_template_kwargs == {"thinking": True}  # newer vLLM passes them


class _Grammar:
    """A grammar that accepts anything and records what it was fed (the gate's inner)."""

    def __init__(self):
        self.fed = []

    def accept(self, token):
        self.fed.append(token)
        return True

    def rollback(self, n):
        del self.fed[len(self.fed) - n:]


def test_the_gate_follows_the_plugins_is_reasoning_end():
    cls = load_plugin(PLUGIN)["think_tags"]
    grammar = _Grammar()
    gate = PluginGate(grammar, cls(Tokenizer()), prompt_token_ids=[5, 6])
    assert not gate.constrains_next
    for token in (1, 10, 2, 20, 21):
        assert gate.accept(token)
    assert grammar.fed == [20, 21] and gate.answer_from == 3
    gate.rollback(3)  # back before </think>: free again
    assert grammar.fed == [] and gate.answer_from is None and not gate.constrains_next
    closed = PluginGate(_Grammar(), cls(Tokenizer()), prompt_token_ids=[5, 1, 2])  # the prompt closed it
    assert closed.constrains_next and closed.accept(20) and closed.inner.fed == [20]


COUNTING_PLUGIN = '''
from tessellm.reasoning.plugins import BaseThinkingReasoningParser, ReasoningParserManager


@ReasoningParserManager.register_module("counted")
class Counted(BaseThinkingReasoningParser):
    """Its own split (so not the house's) and vLLM's end checks, counting the ids they are shown."""

    start_token, end_token = "<think>", "</think>"
    shown = 0

    def extract_reasoning(self, model_output, request):
        return model_output, None

    def is_reasoning_end(self, input_ids):
        self.shown += len(input_ids)
        return super().is_reasoning_end(input_ids)

    def is_reasoning_end_streaming(self, input_ids, delta_ids):
        self.shown += len(delta_ids)
        return super().is_reasoning_end_streaming(input_ids, delta_ids)
'''


def test_the_gate_shows_a_plugin_each_step_once(tmp_path):
    """A long thinking costs the plugin the prompt once and then one id a step (vLLM's
    ``is_reasoning_end_streaming`` of ``BaseThinkingReasoningParser``), not the whole output
    every step (2k steps showed it 2.2M ids before)."""
    path = tmp_path / "counting_plugin.py"
    path.write_text(COUNTING_PLUGIN)
    parser = get_reasoning_parser("counted", str(path))
    assert parser.house(Tokenizer()) is None  # its own extraction: the plugin's gate
    instance = parser.instance(Tokenizer())
    prompt, steps = [5] * 100 + [1], 2_000
    gate = PluginGate(_Grammar(), instance, prompt_token_ids=prompt)
    for _ in range(steps):
        assert gate.accept(10) and gate.answer_from is None
    assert gate.accept(2) and gate.answer_from == steps + 1
    assert instance.shown == len(prompt) + steps + 1


class _Recording(ReasoningParser):
    """A streaming parser that reads only the delta's ids, recording what it was handed."""

    def __init__(self, tokenizer, *args, **kwargs):
        super().__init__(tokenizer)
        self.handed = []

    def extract_reasoning_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                    current_token_ids, delta_token_ids):
        self.handed.append((previous_token_ids, current_token_ids, delta_token_ids))
        return DeltaMessage(content=delta_text) if 2 in delta_token_ids else DeltaMessage(reasoning=delta_text)


def test_a_stream_hands_the_plugin_views_of_the_ids_not_copies():
    """Each delta costs the delta (vLLM's arguments, as read-only sequences): the ids so far are
    never copied, and a view handed earlier keeps its length as the list grows."""
    parser, ids, text = _Recording(Tokenizer()), CountedIds(), ""
    split = PluginSplit(parser, request=None)
    for i in range(1, 2_001):
        ids.append(2 if i == 2_000 else 10 + i)
        text += "x"
        split.split(text, ids, final=False)
    assert ids.walks == 0
    previous, current, delta = parser.handed[-1]
    assert delta == [2] and len(previous) == 1_999 and len(current) == 2_000
    first_previous, first_current, _ = parser.handed[0]
    assert len(first_previous) == 0 and first_current == [11] and list(first_current) == [11]
    assert previous[-1] == 2_009 and current[-2:] == [2_009, 2] and current[::-1][:2] == [2, 2_009]
    assert 2 in current and 2 not in previous and current.index(2) == 1_999
    assert previous + delta == list(current)
    with pytest.raises(IndexError):
        previous[1_999]
    assert split.split(text, ids, final=True) == ("x" * 1_999, "x")
