"""Multi-LoRA combined with the engine's other features, each against a reference: HF
transformers + peft (greedy tokens, logprobs), or the same request without the combination.

Prefix caching with prompts sharing a prefix across adapters, preemption on a tiny KV cache with
fewer slots than adapters, chunked prefill, async scheduling, n > 1 and seeds, logprobs and
prompt logprobs, n-gram and draft-model speculation, and the refusals (unknown adapter, rank
above the limit, an id reused for other files) leaving the engine serving."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.lora import LoRARequest
from tests.lora.adapters import peft_greedy

MAX_NEW = 8
SHARED = [9, 40, 41, 42, 43, 7, 100, 200, 3, 77, 12, 250]  # three blocks of 4
PROMPTS = [SHARED + [5, 6, 7], SHARED + [300, 301], [11, 22, 33], list(range(50, 80))]
NAMES = [None, "qv8", "kogate16", "all32"]


def _greedy(max_tokens=MAX_NEW, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def _ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def loras(lora_setup) -> dict:
    _, paths = lora_setup
    return {None: None, **{n: LoRARequest(n, i + 1, paths[n]) for i, n in enumerate(NAMES[1:])}}


@pytest.fixture(scope="module")
def want(lora_setup) -> dict:
    """{adapter name: HF + peft greedy tokens per prompt}."""
    model, paths = lora_setup
    out = {n: peft_greedy(model, paths[n] if n else None, PROMPTS, MAX_NEW) for n in NAMES}
    assert all(out[n] != out[None] for n in NAMES[1:])  # every adapter matters
    return out


@pytest.fixture(scope="module")
def llm(lora_setup):
    model, _ = lora_setup
    with LLM(model, dtype="float32", enable_lora=True, max_lora_rank=32, block_size=4) as engine:
        yield engine


def _peft_logprobs(model_dir, adapter_dir, prompt, output) -> torch.Tensor:
    """log_softmax of HF + peft's logits at each position of ``prompt + output`` [T, V]."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf = PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([prompt + output])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_prefix_cache_not_shared_across_adapters(llm, loras, want):
    """Prompts sharing a prefix: one adapter's blocks serve only that adapter's requests."""
    run = lambda p, n: llm.generate({"prompt_token_ids": PROMPTS[p]}, _greedy(), use_tqdm=False,  # noqa: E731
                                    lora_request=loras[n])[0]
    first = run(0, "qv8")
    assert first.outputs[0].token_ids == want["qv8"][0]
    other = run(1, "all32")  # the shared prefix, another adapter: no hit
    assert other.num_cached_tokens == 0 and other.outputs[0].token_ids == want["all32"][1]
    base = run(1, None)  # nor the base model
    assert base.num_cached_tokens == 0 and base.outputs[0].token_ids == want[None][1]
    same = run(1, "qv8")  # the same adapter: the shared prefix hits
    assert same.num_cached_tokens == len(SHARED) and same.outputs[0].token_ids == want["qv8"][1]
    # All of them at once, twice (the second time every prompt hits its own adapter's blocks).
    jobs = [(p, n) for p in (0, 1) for n in NAMES]
    for _ in range(2):
        outs = llm.generate([{"prompt_token_ids": PROMPTS[p]} for p, _ in jobs], _greedy(),
                            use_tqdm=False, lora_request=[loras[n] for _, n in jobs])
        assert _ids(outs) == [want[n][p] for p, n in jobs]
    assert outs[0].num_cached_tokens > 0


def test_parallel_sampling_and_seeds(llm, loras, want):
    prompt = {"prompt_token_ids": PROMPTS[2]}
    greedy = llm.generate(prompt, _greedy(n=3), use_tqdm=False, lora_request=loras["kogate16"])[0]
    assert [c.token_ids for c in greedy.outputs] == [want["kogate16"][2]] * 3
    seeded = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=MAX_NEW, ignore_eos=True)
    alone = llm.generate(prompt, seeded, use_tqdm=False, lora_request=loras["all32"])[0]
    # The same seeded request inside a batch of other adapters' requests: the same samples.
    mixed = llm.generate([{"prompt_token_ids": PROMPTS[i % 4]} for i in range(5)] + [prompt],
                         [_greedy()] * 5 + [seeded], use_tqdm=False,
                         lora_request=[loras[NAMES[i % 4]] for i in range(5)] + [loras["all32"]])
    assert [c.token_ids for c in mixed[-1].outputs] == [c.token_ids for c in alone.outputs]
    assert _ids(mixed[:5]) == [want[NAMES[i % 4]][i % 4] for i in range(5)]
    base = llm.generate(prompt, seeded, use_tqdm=False)[0]  # the adapter changes the draws
    assert [c.token_ids for c in base.outputs] != [c.token_ids for c in alone.outputs]


def test_logprobs_match_peft(lora_setup, llm, loras, want):
    model, paths = lora_setup
    prompt = PROMPTS[1]
    out = llm.generate([{"prompt_token_ids": prompt}] * 2, _greedy(logprobs=2, prompt_logprobs=2),
                       use_tqdm=False, lora_request=[loras["all32"], None])[0]
    tokens = out.outputs[0].token_ids
    assert tokens == want["all32"][1]
    ref = _peft_logprobs(model, paths["all32"], prompt, tokens)
    for j, (tok, entry) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + j]
        assert entry[tok].rank == 1
        for t, lp in entry.items():
            assert abs(lp.logprob - row[t].item()) < 1e-4, (j, t)
    for j in range(1, len(prompt)):
        entry, row = out.prompt_logprobs[j], ref[j - 1]
        assert abs(entry[prompt[j]].logprob - row[prompt[j]].item()) < 1e-4, j
        top = torch.topk(row, 2).indices.tolist()
        assert set(top) <= set(entry), j


def test_unknown_adapter_refused_others_unaffected(llm, loras, want, tmp_path):
    missing = LoRARequest("nope", 40, str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="nope.*does not exist"):
        llm.generate([{"prompt_token_ids": PROMPTS[2]}] * 2, _greedy(), use_tqdm=False,
                     lora_request=[loras["qv8"], missing])
    assert not llm.engine.has_unfinished_requests()  # the good request was not left queued
    outs = llm.generate([{"prompt_token_ids": PROMPTS[2]}] * 2, _greedy(), use_tqdm=False,
                        lora_request=[loras["qv8"], None])
    assert _ids(outs) == [want["qv8"][2], want[None][2]]


def test_an_id_names_one_adapter(llm, loras, want, lora_setup):
    """A second adapter under an id already in use would be served with the first one's
    weights (the id keys every cache): refused, naming both."""
    _, paths = lora_setup
    out = llm.generate({"prompt_token_ids": PROMPTS[2]}, _greedy(), use_tqdm=False,
                       lora_request=loras["qv8"])
    assert _ids(out) == [want["qv8"][2]]
    clash = LoRARequest("other", loras["qv8"].lora_int_id, paths["all32"])
    with pytest.raises(ValueError, match="has id 1, which already names adapter 'qv8'"):
        llm.generate({"prompt_token_ids": PROMPTS[2]}, _greedy(), use_tqdm=False, lora_request=clash)
    assert not llm.engine.has_unfinished_requests()
    respelled = LoRARequest("qv8", loras["qv8"].lora_int_id, paths["qv8"] + "/")  # the same files
    out = llm.generate({"prompt_token_ids": PROMPTS[2]}, _greedy(), use_tqdm=False,
                       lora_request=respelled)
    assert _ids(out) == [want["qv8"][2]]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_preemption_chunked_prefill_and_slot_pressure(lora_setup, loras, want, async_scheduling):
    """A KV cache for about two requests, a 16-token step budget (chunked prefill), two slots
    for three adapters and the base model: requests are preempted and recomputed, and every one
    still gets HF + peft's tokens; also scheduling a step ahead (the accelerators' default)."""
    model, _ = lora_setup
    llm = LLM(model, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=32,
              block_size=4, num_kv_blocks=20, max_num_batched_tokens=16,
              async_scheduling=async_scheduling)
    core = llm.engine.core
    schedule, adapters_per_step = core.scheduler.schedule, []

    def observed():  # what each step holds: the adapter ids of its requests
        out = schedule()
        adapters_per_step.append({core.scheduler.requests[r].lora_request.lora_int_id
                                  for r in out.lora_slots})
        return out

    core.scheduler.schedule = observed
    try:
        jobs = [(p, n) for n in NAMES for p in range(len(PROMPTS))]
        outs = llm.generate([{"prompt_token_ids": PROMPTS[p]} for p, _ in jobs], _greedy(),
                            use_tqdm=False, lora_request=[loras[n] for _, n in jobs])
        assert _ids(outs) == [want[n][p] for p, n in jobs]
        assert max(map(len, adapters_per_step)) == 2  # never more adapters than slots
        assert core.scheduler.num_preemptions_total > 0
        assert core.kv.num_free_blocks == core.kv.num_blocks and core.scheduler.lora.users == [0, 0]
    finally:
        llm.shutdown()


def test_rank_above_the_limit_is_refused(lora_setup, loras, want):
    model, _ = lora_setup
    with LLM(model, dtype="float32", enable_lora=True, max_lora_rank=16) as llm:
        with pytest.raises(ValueError, match="rank 32.*--max-lora-rank 32"):
            llm.generate({"prompt_token_ids": PROMPTS[2]}, _greedy(), use_tqdm=False,
                         lora_request=loras["all32"])
        out = llm.generate({"prompt_token_ids": PROMPTS[2]}, _greedy(), use_tqdm=False,
                           lora_request=loras["kogate16"])
        assert _ids(out) == [want["kogate16"][2]]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculation_with_adapters(lora_setup, loras, want, method):
    """Drafts (n-gram, or a draft model without adapters: the base model itself) verified with
    each request's adapter: greedy tokens unchanged."""
    model, _ = lora_setup
    spec = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
             "prompt_lookup_max": 3} if method == "ngram" else
            {"method": "draft_model", "model": model, "num_speculative_tokens": 3})
    with LLM(model, dtype="float32", enable_lora=True, max_lora_rank=32, block_size=4,
             speculative_config=spec, max_num_batched_tokens=32) as llm:
        prompts = range(len(PROMPTS)) if method == "ngram" else (1, 2)  # (the draft is slower)
        jobs = [(p, n) for n in NAMES for p in prompts]
        outs = llm.generate([{"prompt_token_ids": PROMPTS[p]} for p, _ in jobs], _greedy(),
                            use_tqdm=False, lora_request=[loras[n] for _, n in jobs])
        assert _ids(outs) == [want[n][p] for p, n in jobs]
        stats = llm.engine.core.scheduler.spec_stats
        assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
