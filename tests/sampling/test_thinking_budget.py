"""``thinking_token_budget`` (tessellm/reasoning/budget.py): the state machine on token ids, the
sampler's forced rows, and the real engine (``LLM``, cpu) on the tiny bigram "thinking" model
(tests/server/thinking_model.py) whose greedy output is known token for token: its ``[long]``
trigger thinks 40 tokens (`` r0`` ... `` r39``), then ``</think> It is four.``. The budget cuts
the thinking at exactly N tokens, then the end marker, then the model's own answer; the same
output with chunked prefill, async scheduling, preemption (recomputed requests keep their count),
n-gram drafts that run past the cut, n > 1, one- and two-token end markers."""

from __future__ import annotations

import json

import pytest
import torch

from tessellm import LLM
from tessellm.core.sampler import Sampler, SamplingBatch
from tessellm.core.sampling_params import SamplingParams
from tessellm.reasoning.budget import (ThinkingBudget, check_reasoning_config, parse_reasoning_config,
                                      thinking_strings)
from tests.server.thinking_model import FILLER, make_thinking_model

START, END, TOOL = 100, 101, 102
E1, E2 = 201, 202  # a two-token end marker


def _run(state: ThinkingBudget, tokens) -> list:
    """The token forced before each of ``tokens`` (None: free), reading them one by one."""
    seen = []
    for t in tokens:
        seen.append(state.forced())
        state.advance(t)
    return seen + [state.forced()]


def test_counts_after_the_start_marker_then_forces_the_end():
    s = ThinkingBudget(3, [[START]], [[END]], prompt=[1, 2])
    # outside: nothing forced until the model opens the block; three tokens, then </think>
    assert _run(s, [5, START, 7, 8, 9, END, 6]) == [None, None, None, None, None, END, None, None]


def test_budget_zero_and_a_prompt_that_opened_or_closed_the_block():
    assert ThinkingBudget(0, [[START]], [[END]], prompt=[1, START]).forced() == END
    # the prompt's thinking tokens count: 2 of 3 there
    s = ThinkingBudget(3, [[START]], [[END]], prompt=[1, START, 7, 8])
    assert _run(s, [9, END]) == [None, END, None]
    # closed in the prompt (enable_thinking false): free, until the model opens a new block,
    # which has a budget of its own
    s = ThinkingBudget(1, [[START]], [[END]], prompt=[START, 7, END])
    assert _run(s, [5, 6, START, 9, END]) == [None, None, None, None, END, None]


def test_a_natural_end_or_another_end_spelling_stops_the_count():
    s = ThinkingBudget(3, [[START]], [[END], [TOOL]], prompt=[START])
    assert _run(s, [7, TOOL, 8, 9, 10, 11]) == [None, None, None, None, None, None, None]
    s = ThinkingBudget(5, [[START]], [[END]], prompt=[START])
    assert _run(s, [7, END, 8, START, 9]) == [None, None, None, None, None, None]


def test_a_multi_token_end_marker_is_forced_token_by_token():
    s = ThinkingBudget(2, [[START]], [[E1, E2]], prompt=[START])
    assert _run(s, [7, 8, E1, E2, 9]) == [None, None, E1, E2, None, None]
    # written by the model itself, the two tokens end the thinking
    s = ThinkingBudget(9, [[START]], [[E1, E2]], prompt=[START])
    assert _run(s, [7, E1, E2, 8]) == [None, None, None, None, None]
    # the model began the end marker on its last budgeted token: the forcing completes it
    # rather than spelling it again (E1 E1 E2); the budget counts E1, as any thinking token
    s = ThinkingBudget(2, [[START]], [[E1, E2]], prompt=[START])
    assert _run(s, [7, E1, E2, 9]) == [None, None, E2, None, None]
    s = ThinkingBudget(2, [[START]], [[E1, E2]], prompt=[START, 7, E1])  # in the prompt too
    assert s.forced() == E2
    # a start marker of two tokens, the first in the prompt's last token
    s = ThinkingBudget(1, [[50, 51]], [[END]], prompt=[1, 50])
    assert _run(s, [51, 7, END]) == [None, None, END, None]


def test_drafts_are_read_as_if_accepted():
    s = ThinkingBudget(2, [[START]], [[E1, E2]], prompt=[START, 7])
    assert s.forced_after([]) is None and s.forced_after([8]) == E1 and s.forced_after([8, E1]) == E2
    assert s.forced() is None and s.recent == [7]  # the probe left the state as it was


def test_reasoning_config_and_the_parsers_markers():
    assert thinking_strings(None, None) is None
    assert thinking_strings("deepseek_r1", None) == (("<think>",), ("</think>",))
    qwen = thinking_strings("qwen3", None)
    assert qwen[1][0] == "</think>" and "<tool_call>" in qwen[1]  # the tool call ends it too
    assert thinking_strings(None, None, '{"reasoning_start_str": "<a>", "reasoning_end_str": "</a>"}') == (
        ("<a>",), ("</a>",))
    assert thinking_strings("mistral", None, {"reasoning_end_str": "[END]"}) == (("[THINK]",), ("[END]", "[/THINK]"))
    with pytest.raises(ValueError, match="unknown keys"):
        parse_reasoning_config({"think_start_str": "<think>"})
    with pytest.raises(ValueError, match="needs both"):
        check_reasoning_config({"reasoning_start_str": "<think>"}, None, None)
    check_reasoning_config({"reasoning_start_str": "<t>"}, "deepseek_r1", None)  # the end: the parser's
    with pytest.raises(ValueError, match="Unknown reasoning parser 'nope'"):
        check_reasoning_config({"reasoning_parser": "nope"}, None, None)
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_reasoning_config("{nope")
    for bad in (-2, 1.5, True, "3", 2 ** 64):  # past 64 bits: msgpack cannot carry it to the core
        with pytest.raises(ValueError, match="thinking_token_budget must be an integer >= 0"):
            SamplingParams(thinking_token_budget=bad)
    assert SamplingParams(thinking_token_budget=-1).thinking_token_budget is None


def test_the_sampler_forces_a_row_whatever_its_sampling():
    logits = torch.randn(3, 16)
    raw = logits.clone()
    batch = SamplingBatch(torch.tensor([0.0, 1.0, 0.7]), False, None, None, None)
    batch.forced = ([1, 2], [5, 9])
    batch.max_num_logprobs = 2
    out = Sampler(torch.device("cpu"))(logits, batch)
    assert out.token_ids.tolist() == [int(raw[0].argmax()), 5, 9]
    assert torch.equal(logits, raw)  # the raw logits (and so the logprobs) are untouched
    assert out.sampled_logprob[1] == torch.log_softmax(raw[1], -1)[5]


# -- the engine --------------------------------------------------------------------------------

ANSWER = "</think> It is four."


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    return {"single": make_thinking_model(str(root / "single")),
            "split": make_thinking_model(str(root / "split"), split_markers=True)}


def _generate(model, prompt_text, budgets, num_prompts=1, n=1, **engine):
    engine.setdefault("reasoning_parser", "deepseek_r1")
    llm = LLM(model, device="cpu", max_model_len=160, block_size=4, **engine)
    try:
        prompt = llm.get_tokenizer().encode(prompt_text, add_special_tokens=False)
        outs = []
        for budget in budgets:
            params = SamplingParams(max_tokens=60, temperature=0, n=n, thinking_token_budget=budget)
            got = llm.generate([{"prompt_token_ids": prompt}] * num_prompts, params, use_tqdm=False)
            outs.append([c.text for o in got for c in o.outputs])
        return outs, llm.engine.core
    finally:
        llm.shutdown()


def test_budget_cuts_the_thinking_at_exactly_n_tokens(models):
    # "<think>[long]": the prompt opened the block, and its "[long]" is the first thinking token
    outs, _ = _generate(models["single"], "<think>[long]", [None, -1, 0, 1, 5, 40, 41, 100])
    free = "".join(FILLER) + ANSWER
    assert outs == [[free], [free], [ANSWER], [ANSWER], ["".join(FILLER[:4]) + ANSWER],
                    ["".join(FILLER[:39]) + ANSWER], [free], [free]]
    # the prompt closed its block: nothing is forced
    [[closed]], _ = _generate(models["single"], "<think></think>[long]", [2])
    assert closed == free


def test_two_token_end_marker_and_a_reasoning_config(models):
    outs, _ = _generate(models["split"], "<think>[long]", [3, None, 42])
    # 42: "[long]" and r0..r39 are 41, the model's own "</" the 42nd: the forcing completes it
    # ("</" "</" "think>" before)
    assert outs == [["".join(FILLER[:2]) + ANSWER], ["".join(FILLER) + ANSWER], ["".join(FILLER) + ANSWER]]
    # the markers from --reasoning-config, without a reasoning parser
    config = {"reasoning_start_str": "<think>", "reasoning_end_str": "</think>"}
    outs, _ = _generate(models["single"], "<think>[long]", [3], reasoning_parser=None, reasoning_config=config)
    assert outs == [["".join(FILLER[:2]) + ANSWER]]


def test_no_markers_is_refused_naming_the_fix(models):
    with pytest.raises(ValueError, match="--reasoning-parser NAME, or --reasoning-config"):
        _generate(models["single"], "<think>[long]", [3], reasoning_parser=None)


def test_chunked_prefill_async_preemption_drafts_and_n_agree(models):
    prompt = "".join(FILLER[:30]) + "</think> It is four.<think>[long]"  # drafts to copy past the cut
    expected = "".join(FILLER[:6]) + ANSWER
    outs, _ = _generate(models["single"], prompt, [7], n=2)
    assert outs == [[expected] * 2]
    outs, _ = _generate(models["single"], prompt, [7], enable_chunked_prefill=True, max_num_batched_tokens=16)
    assert outs == [[expected]]
    outs, _ = _generate(models["single"], prompt, [7], async_scheduling=True)
    assert outs == [[expected]]
    outs, core = _generate(models["single"], prompt, [7], num_prompts=6, num_kv_blocks=48, max_num_seqs=6)
    assert outs == [[expected] * 6] and core.scheduler.num_preemptions_total > 0
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    outs, core = _generate(models["single"], prompt, [7], speculative_config=ngram)
    assert outs == [[expected]] and core.scheduler.spec_stats.num_accepted_tokens > 0


def test_llm_chat_and_a_json_answer_after_a_cut_thinking(models):
    """``LLM.chat`` takes the budget as ``generate`` does; a JSON schema constrains the answer
    that follows the forced ``</think>`` (the grammar gate sees it as a natural one)."""
    pytest.importorskip("xgrammar")
    from tessellm.structured_output.params import StructuredOutputsParams

    llm = LLM(models["single"], device="cpu", max_model_len=160, block_size=4, reasoning_parser="deepseek_r1")
    try:
        params = SamplingParams(max_tokens=60, temperature=0, thinking_token_budget=3)
        [out] = llm.chat([{"role": "user", "content": "<think>[long]"}], params, use_tqdm=False)
        assert out.outputs[0].text == "".join(FILLER[:2]) + ANSWER
        schema = {"type": "object", "properties": {"a": {"enum": ["yes", "no"]}}, "required": ["a"],
                  "additionalProperties": False}
        params = params.clone(structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True))
        [out] = llm.chat([{"role": "user", "content": "<think>[long]"}], params, use_tqdm=False)
        thinking, marker, answer = out.outputs[0].text.partition("</think>")
        assert (thinking, marker) == ("".join(FILLER[:2]), "</think>")
        assert json.loads(answer) in ({"a": "yes"}, {"a": "no"})
    finally:
        llm.shutdown()


def test_the_prompt_search_finds_the_last_copy():
    """``_last_index`` (reverse ``list.index`` over candidates) against a plain scan."""
    import random

    from tessellm.reasoning.budget import _last_index

    rng = random.Random(0)
    for _ in range(3000):
        seq = [rng.randint(0, 3) for _ in range(rng.randint(0, 12))]
        pattern = [rng.randint(0, 3) for _ in range(rng.randint(1, 3))]
        lo = rng.randint(0, 5)
        want = next((i for i in range(len(seq) - len(pattern), lo - 1, -1) if seq[i:i + len(pattern)] == pattern), -1)
        assert _last_index(seq, pattern, lo) == want, (seq, pattern, lo)


def test_the_engine_core_refuses_a_budget_without_marker_ids(models):
    """A request that skipped the front end (no marker ids) is refused, never fails a step."""
    from tessellm.core.engine_core import EngineCoreRequest

    llm = LLM(models["single"], device="cpu", max_model_len=160, block_size=4, reasoning_parser="deepseek_r1")
    try:
        req = EngineCoreRequest("raw", [5, 6], SamplingParams(max_tokens=4, thinking_token_budget=2), 0.0)
        with pytest.raises(ValueError, match="thinking_start_ids / thinking_end_ids"):
            llm.engine.core.add_request(req)
        # an end marker id past the vocabulary: refused at add_request; it failed the step (an
        # IndexError forcing it) and every request in it before
        prompt = llm.get_tokenizer().encode("<think>[long]", add_special_tokens=False)
        llm.engine.core.add_request(EngineCoreRequest("ok", prompt, SamplingParams(max_tokens=3), 0.0))
        bad = SamplingParams(max_tokens=4, thinking_token_budget=0, thinking_start_ids=[prompt[:1]],
                             thinking_end_ids=[[10 ** 6]])
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            llm.engine.core.add_request(EngineCoreRequest("far", prompt, bad, 0.0))
        tokens = []
        while llm.engine.core.has_unfinished_requests():
            tokens += [t for o in llm.engine.core.step() for t in o.new_token_ids]
        assert len(tokens) == 3
    finally:
        llm.shutdown()


def test_a_cached_prompt_prefix_gives_the_same_cut(models):
    """The prompt's thinking tokens count whether their K/V came from the prefix cache or
    not: a prompt already in the thinking (``<think>[long] r0 .. r9``: 11 counted) cut at 15
    stops after 4 output tokens, the first time and again from the cache; a longer prompt
    that shares its cached blocks counts its own two extra tokens. The runner forgets the
    finished requests (``InputBatch.with_budget`` empty: later steps skip the budget rows)."""
    llm = LLM(models["single"], device="cpu", max_model_len=160, block_size=4, reasoning_parser="deepseek_r1")
    try:
        tok = llm.get_tokenizer()
        params = SamplingParams(max_tokens=40, temperature=0, thinking_token_budget=15)
        runs = []
        for k in (10, 10, 12):
            prompt = tok.encode("<think>[long]" + "".join(FILLER[:k]), add_special_tokens=False)
            [out] = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
            runs.append((out.outputs[0].text, out.num_cached_tokens))
        cut = "".join(FILLER[10:14]) + ANSWER
        assert runs[0] == (cut, 0)
        assert runs[1][0] == cut and runs[1][1] >= 8  # two of its three blocks from the cache
        assert runs[2][0] == "".join(FILLER[12:14]) + ANSWER and runs[2][1] >= 8
        # finished requests leave the runner with the next step's drops: a plain one after them
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=2), use_tqdm=False)
        assert llm.engine.core.executor.worker.runner.batch.with_budget == set()
    finally:
        llm.shutdown()


def test_a_forced_token_reports_the_models_own_logprob_beside_ids_and_repetition(models):
    """A budget with logprob_token_ids and repetition_detection in one request, beside a
    plain one: the cut is where the budget says; the forced ``</think>`` is reported as vLLM
    reports it (its logprob under the model's raw logits, HF's float32, not the forced 0.0;
    its rank in the vocabulary by those logits, then the listed ids' entries); the detection
    reads the forced token as an output token (the cut output has no repeat: it runs to its
    end) and the plain request is untouched."""
    from transformers import AutoModelForCausalLM

    llm = LLM(models["single"], device="cpu", max_model_len=160, block_size=4, reasoning_parser="deepseek_r1")
    try:
        tok = llm.get_tokenizer()
        end, r4 = tok.convert_tokens_to_ids(["</think>", " r4"])
        prompt = tok.encode("<think>[long]", add_special_tokens=False)
        rep = {"max_pattern_size": 3, "min_count": 2}
        both = SamplingParams(max_tokens=40, temperature=0, thinking_token_budget=5,
                              logprob_token_ids=[end, r4], repetition_detection=rep)
        plain = SamplingParams(max_tokens=60, temperature=0)
        got, free = llm.generate([{"prompt_token_ids": prompt}] * 2, [both, plain], use_tqdm=False)
    finally:
        llm.shutdown()
    co = got.outputs[0]
    assert co.text == "".join(FILLER[:4]) + ANSWER and co.finish_reason == "stop"
    assert free.outputs[0].text == "".join(FILLER) + ANSWER
    hf = AutoModelForCausalLM.from_pretrained(models["single"], torch_dtype=torch.float32)
    ids = prompt + list(co.token_ids)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)[len(prompt) - 1:]
    for pos, (token, entry) in enumerate(zip(co.token_ids, co.logprobs)):
        assert list(entry)[:1] == [token] and set(entry) == {token, end, r4}
        for tid in (token, end, r4):
            assert entry[tid].logprob == pytest.approx(ref[pos, tid].item(), abs=1e-4)
    forced = co.token_ids.index(end)
    assert forced == 4 and ref[forced].argmax().item() == r4  # the model wanted " r4" there
    assert co.logprobs[forced][end].logprob < -1.0  # the model's own (low) logprob, not 0.0
    assert co.logprobs[forced][r4].rank == 2  # the listed ids: their place in the list
    assert co.cumulative_logprob == pytest.approx(sum(ref[p, t].item() for p, t in enumerate(co.token_ids)),
                                                  abs=1e-3)
