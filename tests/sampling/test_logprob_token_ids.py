"""vLLM's logprob_token_ids / prompt_logprob_token_ids: the logprobs of chosen ids at every
output (resp. prompt) position equal HF transformers' log-softmax there (float32)."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.core.sampling_params import MAX_LOGPROB_TOKEN_IDS

IDS = [7, 300, 42, 5]  # 300 first: the dict's order follows the list, not the ids


@pytest.fixture(scope="module")
def llm_and_hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("llama")
    llm = LLM(path, dtype="float32", max_num_batched_tokens=8, enable_prefix_caching=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return llm, hf


def _hf_logprobs(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([tokens])).logits[0].float(), -1)


def _check_positions(ref, prompt, completion, ids):
    """Each output position's dict: the sampled token (its vocabulary rank) then ``ids`` with
    rank = their place in the list, values HF's log-softmax."""
    for i, (tok, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert list(entry) == [tok] + [t for t in ids if t != tok]
        for r, tid in enumerate(ids):
            assert entry[tid].logprob == pytest.approx(row[tid].item(), abs=1e-4)
            assert entry[tid].rank == r + 1
        if tok not in ids:
            assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)


def test_logprob_token_ids_match_hf_in_a_mixed_batch(llm_and_hf):
    llm, hf = llm_and_hf
    prompts = [[5, 77, 31, 200, 9], [11, 12, 13], [40, 41, 42, 43, 44, 45]]
    params = [SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprob_token_ids=IDS),
              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=len(IDS[:2]),
                             logprob_token_ids=IDS[:2])]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, prompt, p in zip(outs, prompts, params):
        co = out.outputs[0]
        ref = _hf_logprobs(hf, prompt + list(co.token_ids))
        assert list(co.token_ids) == [int(ref[len(prompt) - 1 + i].argmax()) for i in range(5)]
        if p.logprob_token_ids:
            _check_positions(ref, prompt, co, p.logprob_token_ids)
        else:  # the top-k request beside them is unchanged: its top 2 and the sampled token
            for i, entry in enumerate(co.logprobs):
                top = ref[len(prompt) - 1 + i].topk(2)
                assert set(entry) == set(top.indices.tolist())
        assert co.cumulative_logprob == pytest.approx(
            sum(e[t].logprob for t, e in zip(co.token_ids, co.logprobs)), abs=1e-4)


def test_logprob_token_ids_with_sampling_and_n(llm_and_hf):
    """n > 1 at temperature 1: each sample's positions are scored given its own tokens."""
    llm, hf = llm_and_hf
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    params = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=7, ignore_eos=True,
                            logprob_token_ids=IDS)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert len(out.outputs) == 2
    for co in out.outputs:
        _check_positions(_hf_logprobs(hf, prompt + list(co.token_ids)), prompt, co, IDS)


def test_prompt_logprob_token_ids_match_hf_with_chunks_and_cache(llm_and_hf):
    """Rows prompt_logprob_start .. len(prompt) - 2 (row i scores prompt token i + 1), over
    prefill chunks of 8 tokens; the same prompt again (a prefix-cache hit for others) scores the
    same, and prompt_logprobs beside them are unchanged."""
    import numpy as np

    llm, hf = llm_and_hf
    prompt = list(range(20, 39))  # 19 tokens: 3 chunks
    ref = _hf_logprobs(hf, prompt)
    for start in (0, 5, 17, 18):
        params = SamplingParams(max_tokens=2, temperature=0, prompt_logprob_token_ids=IDS,
                                prompt_logprob_start=start or None, prompt_logprobs=1 if start == 5 else None)
        for _ in range(2):
            out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
            scores = out.prompt_token_id_logprobs
            if start == 18:  # no row before the last one: nothing scored (vLLM: None)
                assert scores is None
                continue
            assert scores.dtype == np.float32 and scores.shape == (len(prompt) - 1 - start, len(IDS))
            want = ref[start:len(prompt) - 1][:, IDS].numpy()
            np.testing.assert_allclose(scores, want, atol=1e-4)
            if start == 5:
                assert out.prompt_logprobs[1][prompt[1]].logprob == pytest.approx(ref[0, prompt[1]].item(),
                                                                                 abs=1e-4)


def test_per_row_prompt_logprob_token_ids_match_hf_with_chunks(llm_and_hf):
    """vLLM PR #56984's form: row j's own ids at prompt row start + j, across prefill chunks of
    8 tokens; short rows padded with -1 score -inf there; a tiled list equals the one list."""
    import numpy as np

    llm, hf = llm_and_hf
    prompt = list(range(50, 67))  # 17 tokens: 3 chunks
    ref = _hf_logprobs(hf, prompt)
    for start in (0, 6):
        rows = [[(7 * j + 3 * k) % 500 for k in range(1 + j % 4)] for j in range(len(prompt) - 1 - start)]
        rows[1] = []  # a row with nothing to score: all -inf
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprob_token_ids=rows,
                                prompt_logprob_start=start)
        scores = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].prompt_token_id_logprobs
        assert scores.dtype == np.float32 and scores.shape == (len(rows), 4)
        for j, row in enumerate(rows):
            np.testing.assert_allclose(scores[j, :len(row)], ref[start + j, row].numpy(), atol=1e-4)
            assert np.all(np.isneginf(scores[j, len(row):]))
    tiled = SamplingParams(max_tokens=1, prompt_logprob_token_ids=np.array([IDS] * 11), prompt_logprob_start=5)
    flat = SamplingParams(max_tokens=1, prompt_logprob_token_ids=IDS, prompt_logprob_start=5)
    a, b = (llm.generate({"prompt_token_ids": prompt}, p, use_tqdm=False)[0].prompt_token_id_logprobs
            for p in (tiled, flat))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rows, start, match", [
    ([[4]] * 3, None, "has 3 rows, but a 5-token prompt scored from prompt_logprob_start=0 has 4"),
    ([[4]] * 4, 2, "has 4 rows, but a 5-token prompt scored from prompt_logprob_start=2 has 2"),
    ([[4], [10**6], [1], [2]], None, "prompt_logprob_token_ids has 1000000, outside the vocabulary"),
])
def test_per_row_ids_that_do_not_fit_the_prompt_are_refused(llm_and_hf, rows, start, match):
    llm, _ = llm_and_hf
    params = SamplingParams(max_tokens=2, prompt_logprob_token_ids=rows, prompt_logprob_start=start)
    with pytest.raises(ValueError, match=match):
        llm.generate({"prompt_token_ids": [1, 2, 3, 4, 5]}, params, use_tqdm=False)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2  # the engine serves on


def test_per_row_ids_are_padded_with_minus_one():
    params = SamplingParams(prompt_logprob_token_ids=[[3], [5, 6, 7], [], [8, -1]])
    assert params.prompt_logprob_token_ids == [[3, -1, -1], [5, 6, 7], [-1, -1, -1], [8, -1, -1]]
    assert params.prompt_ids_per_row and not SamplingParams(prompt_logprob_token_ids=[3]).prompt_ids_per_row


@pytest.mark.parametrize("changes, match", [
    ({"logprob_token_ids": [1, 10**6]}, "logprob_token_ids has 1000000, outside the vocabulary"),
    ({"prompt_logprob_token_ids": [-1]}, "prompt_logprob_token_ids has -1, outside the vocabulary"),
])
def test_out_of_vocabulary_ids_are_refused(llm_and_hf, changes, match):
    llm, _ = llm_and_hf
    with pytest.raises(ValueError, match=match):
        llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2, **changes), use_tqdm=False)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2  # the engine serves on


@pytest.mark.parametrize("changes, match", [
    ({"logprob_token_ids": list(range(MAX_LOGPROB_TOKEN_IDS + 1))}, "over the limit of 128"),
    ({"logprob_token_ids": [1, 2], "logprobs": 3}, "logprobs must equal len"),
    ({"logprob_token_ids": [1, "2"]}, "must be a list of token ids"),
    ({"prompt_logprob_token_ids": []}, "must not be empty"),
    ({"prompt_logprob_token_ids": [4, 4]}, "must not contain duplicates"),
    ({"prompt_logprob_token_ids": [[4], 5]}, "or a list of such lists"),
    ({"prompt_logprob_token_ids": [[], []]}, "no id in any row"),
    ({"prompt_logprob_token_ids": [[4], [-1, 5]]}, "row 1 has -1 \\(padding\\) before an id"),
    ({"prompt_logprob_token_ids": [[4, 4]]}, "row 0 has duplicate ids"),
    ({"prompt_logprob_token_ids": [[4, -2]]}, "row 0 must be a list of token ids"),
    ({"prompt_logprob_token_ids": [4], "prompt_logprob_start": -1}, "non-negative"),
])
def test_bad_values_are_refused_in_one_sentence(changes, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**changes)


def test_empty_logprob_token_ids_ask_nothing():
    assert SamplingParams(logprob_token_ids=[]).num_logprobs is None
    assert SamplingParams(logprob_token_ids=[3, 4]).num_logprobs == 2


def test_speculative_steps_score_and_stop_every_accepted_token(tiny_model_dir, llm_and_hf):
    """Replay drafts all accepted (k + 1 tokens a step): each accepted token's position has its
    ids' logprobs as without speculation, and repetition_detection stops on the token that
    completes the repetition, dropping the rest of its step."""
    from tessellm.core.repetition import RepetitionDetectionParams

    llm, _ = llm_and_hf
    prompt = [100, 200, 300]  # the tiny model's greedy output loops after it
    plain = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprob_token_ids=IDS)
    want = llm.generate({"prompt_token_ids": prompt}, plain, use_tqdm=False)[0].outputs[0]
    rep = RepetitionDetectionParams(max_pattern_size=8, min_pattern_size=2, min_count=3)
    stopped = llm.generate({"prompt_token_ids": prompt}, plain.clone(repetition_detection=rep),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "repetition" and len(stopped.token_ids) < len(want.token_ids)
    records = [{"prompt_token_ids": prompt, "output_token_ids": list(want.token_ids)}]
    spec = LLM(tiny_model_dir("llama"), dtype="float32", block_size=4, num_kv_blocks=256,
               speculative_config={"method": "replay", "num_speculative_tokens": 4, "replay_records": records})
    try:
        got = spec.generate({"prompt_token_ids": prompt}, plain, use_tqdm=False)[0].outputs[0]
        stats = spec.engine.core.scheduler.spec_stats
        assert stats.num_accepted_tokens == stats.num_draft_tokens > 0
        assert list(got.token_ids) == list(want.token_ids)
        for a, b in zip(got.logprobs, want.logprobs):
            assert list(a) == list(b) and all(a[t].logprob == pytest.approx(b[t].logprob, abs=1e-5) for t in a)
        cut = spec.generate({"prompt_token_ids": prompt}, plain.clone(repetition_detection=rep),
                            use_tqdm=False)[0].outputs[0]
        assert list(cut.token_ids) == list(stopped.token_ids) and cut.finish_reason == "repetition"
    finally:
        spec.shutdown()


def test_async_scheduling_reports_the_same_positions(tiny_model_dir, llm_and_hf):
    """Steps in flight (async scheduling: a step launched before the last one's tokens are on
    the host) carry each step's id logprobs through the readback: the same dicts as the
    synchronous engine, beside a top-k request and a plain one."""
    llm, _ = llm_and_hf
    prompts = [{"prompt_token_ids": p} for p in ([5, 77, 31, 200, 9], [11, 12, 13], [40, 41, 42])]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprob_token_ids=IDS),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]
    want = llm.generate(prompts, params, use_tqdm=False)
    with LLM(tiny_model_dir("llama"), dtype="float32", async_scheduling=True) as overlapped:
        got = overlapped.generate(prompts, params, use_tqdm=False)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        if w.outputs[0].logprobs is None:
            assert g.outputs[0].logprobs is None
            continue
        for a, b in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
            assert list(a) == list(b) and [x.rank for x in a.values()] == [x.rank for x in b.values()]
            assert [x.logprob for x in a.values()] == pytest.approx([x.logprob for x in b.values()], abs=1e-5)
