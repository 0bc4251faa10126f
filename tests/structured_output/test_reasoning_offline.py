"""Structured output after reasoning on the real engine (``LLM``, cpu) with the tiny bigram
"thinking" model (tests/server/thinking_model.py): 40 free thinking tokens, ``</think>``, then a
JSON answer the schema constrains. The same greedy output with n-gram speculation whose drafts
cross ``</think>`` (the prompt holds the thinking's tail and an answer to copy from), with
preemption in a tight KV cache (requests recomputed mid-thinking and mid-answer keep their place),
and with async scheduling (deferred masks)."""

from __future__ import annotations

import json

import pytest

from tessellm import LLM
from tessellm.core.sampling_params import SamplingParams
from tessellm.structured_output.params import StructuredOutputsParams
from tests.server.thinking_model import FILLER, make_thinking_model

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 2}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_thinking_model(str(tmp_path_factory.mktemp("thinking")))


def _run(model, num_prompts=1, **engine):
    llm = LLM(model, device="cpu", max_model_len=160, block_size=4, reasoning_parser="deepseek_r1", **engine)
    try:
        tok = llm.get_tokenizer()
        # The prompt's text ends with the thinking's tail and an answer, so n-gram drafts copy
        # across </think>; its last token starts the 40-token thinking chain.
        prompt = tok.encode("".join(FILLER[30:]) + '</think>{"answer":"no"}[long]', add_special_tokens=False)
        params = SamplingParams(max_tokens=80, temperature=0, structured_outputs=StructuredOutputsParams(
            json=SCHEMA, disable_any_whitespace=True))
        outs = llm.generate([{"prompt_token_ids": prompt}] * num_prompts, params, use_tqdm=False)
        return [(o.outputs[0].text, o.outputs[0].token_ids) for o in outs], llm.engine.core
    finally:
        llm.shutdown()


def test_answer_follows_the_schema_after_free_thinking_and_every_path_agrees(model):
    (plain,), _ = _run(model)
    thinking, _, answer = plain[0].partition("</think>")
    assert thinking == "".join(FILLER)  # free: no JSON grammar would allow " r0"
    jsonschema.validate(json.loads(answer), SCHEMA)

    spec, core = _run(model, speculative_config=NGRAM)
    assert spec == [plain]
    assert core.scheduler.spec_stats.num_accepted_tokens > 0

    tight, core = _run(model, num_prompts=6, num_kv_blocks=40, max_num_seqs=6)
    assert tight == [plain] * 6
    assert core.scheduler.num_preemptions_total > 0

    tight_spec, core = _run(model, num_prompts=6, num_kv_blocks=40, max_num_seqs=6, speculative_config=NGRAM)
    assert tight_spec == [plain] * 6
    assert core.scheduler.num_preemptions_total > 0 and core.scheduler.spec_stats.num_accepted_tokens > 0

    deferred, core = _run(model, num_prompts=3, async_scheduling=True)
    assert deferred == [plain] * 3


def test_without_a_reasoning_parser_the_grammar_constrains_from_the_first_token(model):
    """The control: the same request with no parser is JSON from its first token."""
    llm = LLM(model, device="cpu", max_model_len=160, block_size=4)
    try:
        prompt = llm.get_tokenizer().encode("[long]", add_special_tokens=False)
        params = SamplingParams(max_tokens=80, temperature=0, structured_outputs=StructuredOutputsParams(
            json=SCHEMA, disable_any_whitespace=True))
        text = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].text
    finally:
        llm.shutdown()
    jsonschema.validate(json.loads(text), SCHEMA)
