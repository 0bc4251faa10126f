"""vLLM's other reasoning parsers end to end, one server per family of rules, on the tiny
bigram thinking model (``thinking_model.py``) with each family's markers: the exact split of
thinking and answer, whole and streamed (the stream reassembles to the whole response), and
structured output that starts after the thinking. ``test_reasoning_parsers.py`` has every
parser's rules on model-shaped outputs; ``test_reasoning.py`` deepseek_r1 and qwen3
(``test_reasoning_qwen3.py`` qwen3's rules)."""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from tests.server.conftest import start_server, stop_server
from tests.server.test_reasoning import SCHEMA, _chat, _check_stream_matches
from tests.server.thinking_model import make_thinking_model

pytest.importorskip("xgrammar")

ANSWER = " It is four."
THINKING = " Let me see. Two and two."
PLUGIN = os.path.join(os.path.dirname(__file__), "reasoning_plugin.py")
JSON = {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
        "structured_outputs": {"disable_any_whitespace": True}, "max_tokens": 40}


@contextlib.contextmanager
def _served(tmp_path, parser: str, *flags: str, **model):
    """A server of ``parser`` on a thinking model made with ``model``; stopped at once after
    (each holds ~2 GB)."""
    path = make_thinking_model(str(tmp_path / parser), **model)
    srv = start_server([path, "--served-model-name", "m", "--reasoning-parser", parser, *flags],
                       kernel_warmup=False)
    try:
        yield srv
    finally:
        stop_server(srv)


def _split(srv, trigger, **body):
    m = _chat(srv, trigger, **body)["choices"][0]["message"]
    _check_stream_matches(srv, trigger, m, markers_split=False, **body)
    return m.get("reasoning"), m.get("content")


def _json_after_thinking(srv, trigger, thinking, **body):
    jsonschema = pytest.importorskip("jsonschema")
    reasoning, content = _split(srv, trigger, **JSON, **body)
    assert reasoning == thinking
    jsonschema.validate(json.loads(content), SCHEMA)


def test_implicit_start_seed_oss(tmp_path):
    """seed_oss (as step3, minimax_m2, olmo3, deepseek_r1): all before the end marker is thinking,
    the opening marker optional; its own single-token markers."""
    with _served(tmp_path, "seed_oss", markers=("<seed:think>", "</seed:think>")) as srv:
        assert _split(srv, "[think]") == (THINKING, ANSWER)
        assert _split(srv, "[bare]") == (" I recall", ANSWER)
        assert _split(srv, "[noend]", max_tokens=7) == (" Step by step Step by step Step", None)
        _json_after_thinking(srv, "[json]", " Think: {not json")


@pytest.mark.slow  # a server each; the rule itself: test_reasoning_parsers.py (default suite)
def test_opening_required_mistral_special_tokens(tmp_path):
    """mistral (as gemma4, minimax_m3): thinking only in a block that opens the output; its markers
    are special tokens, kept in the text for the request."""
    with _served(tmp_path, "mistral", markers=("[THINK]", "[/THINK]"), special_markers=True) as srv:
        assert _split(srv, "[think]") == (THINKING, ANSWER)
        assert _split(srv, "[bare]") == (None, " I recall[/THINK]" + ANSWER)
        _json_after_thinking(srv, "[think]", THINKING)


def test_thinking_switch_deepseek_v3(tmp_path):
    """deepseek_v3: R1's rule with chat_template_kwargs thinking (or enable_thinking) on, all
    answer without; structured output follows the same switch."""
    with _served(tmp_path, "deepseek_v3") as srv:
        on = {"chat_template_kwargs": {"thinking": True}}
        assert _split(srv, "[bare]", **on) == (" I recall", ANSWER)
        assert _split(srv, "[bare]", chat_template_kwargs={"enable_thinking": True}) == (" I recall", ANSWER)
        assert _split(srv, "[bare]") == (None, " I recall</think>" + ANSWER)
        assert _split(srv, "[think]") == (None, "<think>" + THINKING + "</think>" + ANSWER)
        _json_after_thinking(srv, "[think]", THINKING, **on)
        # Thinking off: the engine core constrains from the first token, as the server splits
        # (the server tells it where the output starts; this template's prompt does not).
        _json_after_thinking(srv, "[json]", None)
        _json_after_thinking(srv, "[think]", None)  # the grammar, not the model's <think>, comes first


@pytest.mark.slow  # a server each; the rule itself: test_reasoning_parsers.py (default suite)
def test_text_markers_with_two_spellings_granite(tmp_path):
    """granite: plain-text markers, "Here is" or "Here's"; no opening phrase: all answer."""
    markers = ("Here's my thought process:", "Here is my response:")
    with _served(tmp_path, "granite", markers=markers) as srv:
        assert _split(srv, "[think]") == (THINKING, ANSWER)
        assert _split(srv, "[bare]") == (None, " I recall" + markers[1] + ANSWER)


@pytest.mark.slow  # a server each; the rule itself: test_reasoning_parsers.py (default suite)
def test_answer_envelope_ernie45(tmp_path):
    """ernie45: the answer's own <response> ... </response> envelope is dropped."""
    chains = {"[think]": ["<think>", " Hmm.", "</think>", "<response>", " Four.", "</response>", "</s>"]}
    with _served(tmp_path, "ernie45", chains=chains) as srv:
        assert _split(srv, "[think]") == (" Hmm.", " Four.")


@pytest.mark.slow  # a server each; the rule itself: test_reasoning_parsers.py (default suite)
def test_thinking_kept_in_the_answer_minimax_m2_append_think(tmp_path):
    with _served(tmp_path, "minimax_m2_append_think") as srv:
        assert _split(srv, "[bare]") == (None, "<think> I recall</think>" + ANSWER)


@pytest.mark.slow  # a server each; the rule itself: test_reasoning_parsers.py (default suite)
def test_reasoning_label_gemma4(tmp_path):
    """gemma4: special-token channel markers, the channel's "thought\\n" label dropped from the
    reasoning; an output that does not open the channel is all answer. Under a json_schema its
    first token may be the grammar's or the channel's opening: this model takes the opening
    (its best allowed token), thinks, and answers in JSON after the channel closes."""
    chains = {"[think]": ["<think>", "thought\n", " Hmm.", "</think>", " Four.", "</s>"],
              "[json]": [" Think:", " {not json", "</s>"]}
    with _served(tmp_path, "gemma4", markers=("<|channel>", "<channel|>"), special_markers=True,
                 chains=chains) as srv:
        assert _split(srv, "[think]") == (" Hmm.", " Four.")
        assert _split(srv, "[json]") == (None, " Think: {not json")
        _json_after_thinking(srv, "[json]", " Hmm.")


def test_plugin_parser(tmp_path):
    """--reasoning-parser-plugin: a vLLM-style class (its streaming method per delta) and a
    BaseThinkingReasoningParser (run as a built-in parser); structured output through the
    plugin's is_reasoning_end."""
    with _served(tmp_path, "think_tags", "--reasoning-parser-plugin", PLUGIN) as srv:
        assert _split(srv, "[think]") == (THINKING, ANSWER)
        assert _split(srv, "[bare]") == (None, " I recall</think>" + ANSWER)
        _json_after_thinking(srv, "[think]", THINKING)
    with _served(tmp_path, "seed_tags", "--reasoning-parser-plugin", PLUGIN,
                 markers=("<seed:think>", "</seed:think>")) as srv:
        assert _split(srv, "[bare]") == (" I recall", ANSWER)
        _json_after_thinking(srv, "[json]", " Think: {not json")
