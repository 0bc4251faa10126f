"""Structured output through ``LLM`` on the bundled SmolLM2: every form in one batch, on a KV
cache too small for all of it, so constrained requests are preempted mid-grammar."""

from __future__ import annotations

import json
import re

import pytest

from tessellm import LLM, SamplingParams
from tessellm.structured_output import StructuredOutputsParams as S

from so_schemas import SCHEMAS  # noqa: E402 (this directory is on sys.path)

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe not"]
GRAMMAR = 'root ::= "The answer is " ("left" | "right") "."'
TAG = {"type": "structural_tag", "triggers": ["<n>"],
       "structures": [{"begin": "<n>", "schema": {"type": "integer", "minimum": 0, "maximum": 9}, "end": "</n>"}]}


def _params(structured=None, max_tokens=48):
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=structured)


@pytest.fixture(scope="module")
def llm():
    # 40 blocks of 16 tokens, no sharing of the common chat-template prefix: fewer than the
    # batch below needs at once, so some requests are preempted.
    with LLM(max_model_len=512, num_kv_blocks=40, block_size=16, enable_prefix_caching=False) as engine:
        yield engine


@pytest.fixture(scope="module")
def batch(llm):
    """One batch: every schema, the other forms, and an unconstrained request."""
    names = list(SCHEMAS)
    convs = [[{"role": "user", "content": f"Reply with a JSON value ({n})."}] for n in names]
    params = [_params(S(json=SCHEMAS[n], disable_any_whitespace=True)) for n in names]
    extra = {
        "json_object": ('Reply with a JSON object such as {"a": 1}.', S(json_object=True, disable_any_whitespace=True)),
        "regex": ("Give me a code.", S(regex=REGEX)),
        "choice": ("Is the sky green?", S(choice=CHOICES)),
        "grammar": ("Left or right?", S(grammar=GRAMMAR)),
        "plain": ("What is the capital of France?", None),
    }
    for prompt, structured in extra.values():
        convs.append([{"role": "user", "content": prompt}])
        params.append(_params(structured, 24 if structured is None else 48))
    # Compile every grammar first (one token each): the engine's compile cache then has them
    # all, so the whole batch is admitted together however slow the machine compiles, and
    # the cache is short of blocks whatever the timing.
    llm.chat(convs, [_params(p.structured_outputs, 1) for p in params], use_tqdm=False)
    llm.preemptions_before_batch = llm.engine.core.scheduler.num_preemptions_total
    outs = llm.chat(convs, params, use_tqdm=False)
    texts = {name: o.outputs[0] for name, o in zip(names + list(extra), outs)}
    return texts


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_output_validates(batch, name):
    out = batch[name]
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), SCHEMAS[name])


def test_other_forms_match(batch):
    texts = batch
    assert isinstance(json.loads(texts["json_object"].text), dict)
    assert re.fullmatch(REGEX, texts["regex"].text), texts["regex"].text
    assert texts["choice"].text in CHOICES
    assert re.fullmatch(r"The answer is (left|right)\.", texts["grammar"].text)


def test_constrained_requests_were_preempted_mid_grammar(batch, llm):
    """The batch needs ~90 blocks of the 40: requests were preempted mid-output and recomputed
    from their tokens; their outputs above still validate (matchers keep the accepted tokens,
    nothing is replayed)."""
    assert llm.engine.core.scheduler.num_preemptions_total > llm.preemptions_before_batch


def test_unconstrained_request_unchanged_by_constrained_neighbours(batch, llm):
    alone = llm.chat([{"role": "user", "content": "What is the capital of France?"}], _params(None, 24),
                     use_tqdm=False)[0].outputs[0]
    assert alone.token_ids == batch["plain"].token_ids


def test_structural_tag_and_malformed_spec(llm):
    out = llm.generate("Count: <n>", _params(S(structural_tag=TAG), 12), use_tqdm=False)[0].outputs[0]
    for inner in re.findall(r"<n>(.*?)</n>", out.text):
        assert 0 <= int(inner) <= 9
    with pytest.raises(ValueError, match="structured_outputs.json is invalid.*objectx"):
        llm.generate("Hi", _params(S(json={"type": "objectx"})), use_tqdm=False)
    # the engine keeps serving
    assert llm.generate("Hi", _params(S(choice=["a", "b"])), use_tqdm=False)[0].outputs[0].text in ("a", "b")


def test_min_tokens_past_the_grammar_end_adds_no_stray_token(llm):
    """min_tokens holds back EOS after the grammar has ended, so every token is masked and the
    sampler's pick is arbitrary (token 0): the request ends there ("grammar") and that token is
    never output (it was, as the last token, decoded into the text: a raw control character
    with some vocabularies)."""
    tok = llm.get_tokenizer()
    for extra in ({}, {"temperature": 1.0, "seed": 3}):
        params = SamplingParams(**{"temperature": 0, "max_tokens": 16, "min_tokens": 12, **extra},
                                structured_outputs=S(choice=["yes", "no"]))
        out = llm.generate("Is the sky blue?", params, use_tqdm=False)[0].outputs[0]
        assert out.text in ("yes", "no") and out.finish_reason == "stop" and out.stop_reason == "grammar"
        assert tok.decode(out.token_ids, skip_special_tokens=False) == out.text


@pytest.mark.parametrize("executor", ["uni", pytest.param("mp", marks=pytest.mark.slow)])
def test_async_scheduling_defers_masks_and_keeps_tokens(batch, executor):
    """Async scheduling (in process, and through a worker process): constrained requests go one
    step ahead with their masks filled after the step before is back (in the background, while
    the engine loop goes on to schedule the next step), and every request's greedy tokens equal
    the synchronous engine's above."""
    names = list(SCHEMAS)[:2]
    convs = [[{"role": "user", "content": f"Reply with a JSON value ({n})."}] for n in names]
    params = [_params(S(json=SCHEMAS[n], disable_any_whitespace=True)) for n in names]
    convs += [[{"role": "user", "content": "Give me a code."}],
              [{"role": "user", "content": "What is the capital of France?"}]]
    params += [_params(S(regex=REGEX)), _params(None, 24)]
    with LLM(max_model_len=512, async_scheduling=True, distributed_executor_backend=executor) as engine:
        outs = engine.chat(convs, params, use_tqdm=False)
        structured = engine.engine.core.structured
        assert structured.num_deferred_steps > 0
        assert structured.num_background_fills > 0  # filled while the loop scheduled the next step
    for name, out in zip(names + ["regex", "plain"], outs):
        assert out.outputs[0].token_ids == batch[name].token_ids, name
