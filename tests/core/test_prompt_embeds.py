"""``prompt_embeds`` (tessellm/core/prompt_embeds.py) on the cpu backend, a tiny Llama against
HF transformers: the model's own embedding of a prompt gives the token prompt's greedy tokens;
perturbed embeddings give HF ``generate(inputs_embeds=...)``'s tokens, also chunked over several
steps and batched with token prompts; the prefix cache keys on the embeddings' content; bad
embeddings and a missing flag are one clear ValueError each, and the engine serves on."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.conftest import hf_greedy

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG = list(range(3, 43))  # 40 tokens: three chunks of max_num_batched_tokens=16
SHORT = [1, 5, 9, 22, 33, 44, 55]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(model_dir, device="cpu", num_kv_blocks=64, max_num_batched_tokens=16,
             enable_prompt_embeds=True) as engine:
        yield engine


def _embed(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf.get_input_embeddings()(torch.tensor(ids)).clone()


def _perturbed(hf, ids: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = _embed(hf, ids)
    return base + 0.5 * torch.randn(base.shape, generator=gen)


def _hf_embeds_greedy(hf, embeds: torch.Tensor) -> list[int]:
    with torch.no_grad():
        out = hf.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                          max_new_tokens=GREEDY.max_tokens, do_sample=False, pad_token_id=0)
    return out[0].tolist()


def _gen(llm, prompts, params=GREEDY):
    return llm.generate(prompts, params, use_tqdm=False)


def test_own_embeddings_give_the_token_prompts_tokens(llm, hf, model_dir):
    expected = hf_greedy(model_dir, [LONG, SHORT], GREEDY.max_tokens)
    outs = _gen(llm, [{"prompt_embeds": _embed(hf, LONG)}, {"prompt_embeds": _embed(hf, SHORT)}])
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert outs[0].prompt_token_ids == [0] * len(LONG)  # placeholders, one per row


def test_perturbed_embeddings_match_hf_inputs_embeds(llm, hf):
    """Batched with a token prompt; the 40-row prompt runs in three chunks."""
    a, b = _perturbed(hf, LONG, 1), _perturbed(hf, SHORT, 2)
    outs = _gen(llm, [{"prompt_embeds": a}, {"prompt_token_ids": SHORT}, {"prompt_embeds": b}])
    assert outs[0].outputs[0].token_ids == _hf_embeds_greedy(hf, a)
    assert outs[2].outputs[0].token_ids == _hf_embeds_greedy(hf, b)
    assert outs[0].outputs[0].token_ids != _gen(llm, {"prompt_embeds": _embed(hf, LONG)})[0].outputs[0].token_ids


def test_prefix_cache_keys_on_the_embeddings(llm, hf):
    a = _perturbed(hf, LONG, 3)
    first = _gen(llm, {"prompt_embeds": a})[0]
    again = _gen(llm, {"prompt_embeds": a.clone()})[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first.outputs[0].token_ids
    other = _gen(llm, {"prompt_embeds": _perturbed(hf, LONG, 4)})[0]
    assert other.num_cached_tokens == 0  # same length, same placeholder ids: other content
    zeros = _gen(llm, {"prompt_token_ids": [0] * len(LONG)})[0]
    assert zeros.num_cached_tokens == 0  # token prompts never hit embeddings' blocks


def test_device_rows_are_dropped_once_the_prompt_is_computed(llm, hf):
    """The runner's copy of the rows goes with the prompt's last chunk, not with the request."""
    engine, rid = llm.engine, "held-rows"
    engine.add_request(rid, {"prompt_embeds": _perturbed(hf, LONG, 5)},
                       SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        state = engine.core.runner.requests.get(rid)
        if state is not None:
            held.append((state.num_computed_tokens, state.prompt_embeds is not None))
    assert held[0] == (16, True)  # mid-prompt (16 of 40 rows): still needed
    assert all(not has for computed, has in held if computed >= len(LONG)), held


def test_n_samples_share_the_prompt(llm, hf):
    a = _perturbed(hf, SHORT, 5)
    out = _gen(llm, {"prompt_embeds": a}, SamplingParams(n=2, max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    expected = _hf_embeds_greedy(hf, a)
    assert [c.token_ids for c in out.outputs] == [expected, expected]


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(4, 32), "hidden size is 64"),
    (torch.zeros(64), "must be 2-D"),
    (torch.zeros(0, 64), "empty"),
    (torch.zeros(4, 64, dtype=torch.int64), "floating point"),
    (torch.full((4, 64), float("nan")), "NaN"),
    ([[0.0] * 64], "torch.Tensor"),
    (torch.zeros(4, 64).to_sparse(), "dense tensor"),
])
def test_bad_embeddings_are_refused(llm, bad, message):
    with pytest.raises(ValueError, match=message):
        _gen(llm, {"prompt_embeds": bad})
    assert _gen(llm, {"prompt_token_ids": SHORT})[0].outputs[0].token_ids  # serves on


def test_prompt_logprobs_and_extra_keys_are_refused(llm, hf):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        _gen(llm, {"prompt_embeds": _embed(hf, SHORT)}, SamplingParams(max_tokens=2, prompt_logprobs=1))
    with pytest.raises(ValueError, match="takes no 'prompt_token_ids'"):
        _gen(llm, {"prompt_embeds": _embed(hf, SHORT), "prompt_token_ids": SHORT})


def test_penalties_see_no_placeholder_prompt_tokens():
    """repetition_penalty reaches prompt tokens; an embeddings prompt has none (its ids are
    placeholders, 0), as HF's generate(inputs_embeds=...) penalizes only generated tokens."""
    from tessellm.core.input_batch import RunnerRequest
    from tessellm.core.sampling_metadata import build_sampling_batch

    params = SamplingParams(repetition_penalty=1.5, temperature=0.0)
    tokens = RunnerRequest("t", [3, 4, 7], 2, params, [], 2)
    embeds = RunnerRequest("e", [0, 0, 7], 2, params, [], 2, embeds_prompt=True)
    batch = build_sampling_batch([tokens, embeds], lambda i: 1, torch.device("cpu"), 16, ())
    assert batch.prompt_mask[0].nonzero().flatten().tolist() == [3, 4]
    assert not batch.prompt_mask[1].any()
    assert batch.output_counts[1].nonzero().flatten().tolist() == [7]


def test_beam_search_refuses_prompt_embeds(llm, hf):
    """Beam search extends token ids: an embeddings prompt (placeholder ids) is refused, not
    searched from the placeholders."""
    from tessellm.entrypoints.beam_search import BeamSearchParams

    with pytest.raises(ValueError, match="does not take prompt_embeds"):
        llm.beam_search([{"prompt_embeds": _embed(hf, SHORT)}], BeamSearchParams(beam_width=2, max_tokens=2))


def test_bfloat16_embeddings_are_cast_to_the_model_dtype(llm, hf):
    a = _perturbed(hf, SHORT, 6).to(torch.bfloat16)
    out = _gen(llm, {"prompt_embeds": a})[0]
    assert out.outputs[0].token_ids == _hf_embeds_greedy(hf, a.float())


def test_prompt_embeds_need_the_flag(model_dir, hf):
    with LLM(model_dir, device="cpu", num_kv_blocks=16) as plain:
        with pytest.raises(ValueError, match="enable_prompt_embeds=True"):
            _gen(plain, {"prompt_embeds": _embed(hf, SHORT)})


def test_prompt_embeds_refuse_speculative_decoding(model_dir):
    with pytest.raises(ValueError, match="speculative decoding"):
        LLM(model_dir, device="cpu", enable_prompt_embeds=True,
            speculative_config={"method": "ngram", "num_speculative_tokens": 2})


def test_preempted_embeddings_prompt_resumes_with_hf_tokens(model_dir, hf):
    """Two 40-row prompts, 30 tokens each, in a 96-token KV cache: one is preempted and
    recomputed from its embeddings (sent again to the runner) and still gives HF's tokens."""
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    embeds = [_perturbed(hf, LONG, 7), _perturbed(hf, LONG, 8)]
    with LLM(model_dir, device="cpu", num_kv_blocks=6, max_num_batched_tokens=16,
             enable_prompt_embeds=True) as small:
        outs = _gen(small, [{"prompt_embeds": e} for e in embeds], params)
        assert small.engine.core.scheduler.num_preemptions_total > 0
    for out, e in zip(outs, embeds):
        with torch.no_grad():
            ref = hf.generate(inputs_embeds=e[None], attention_mask=torch.ones(1, len(e), dtype=torch.long),
                              max_new_tokens=30, do_sample=False, pad_token_id=0)[0].tolist()
        assert out.outputs[0].token_ids == ref
