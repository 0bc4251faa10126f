"""Multi-LoRA: greedy tokens of a mixed batch equal HF transformers + peft per adapter (fp32)."""

from __future__ import annotations

import random

import pytest

from tessellm import LLM, SamplingParams
from tessellm.lora import LoRARequest
from tests.lora.adapters import ADAPTERS, peft_greedy

MAX_NEW = 8


def _prompts(n: int = 5) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(384) for _ in range(rng.choice([3, 11, 20, 37]))] for _ in range(n)]


@pytest.fixture(scope="module")
def expected(lora_setup):
    model, paths = lora_setup
    prompts = _prompts()
    want = {None: peft_greedy(model, None, prompts, MAX_NEW)}
    for name in ADAPTERS:
        want[name] = peft_greedy(model, paths[name], prompts, MAX_NEW)
    for name in ADAPTERS:  # the adapters matter: each changes some prompt's tokens
        assert want[name] != want[None], name
    return prompts, want


def _requests(paths) -> dict:
    return {name: LoRARequest(name, i + 1, paths[name]) for i, name in enumerate(ADAPTERS)}


@pytest.mark.parametrize("variant", [dict(), dict(max_loras=1, max_num_batched_tokens=24,
                                                 kernel_warmup=True)],
                         ids=["slots-for-all", "one-slot-chunked-warmup"])
def test_mixed_batch_matches_peft(lora_setup, expected, variant):
    model, paths = lora_setup
    prompts, want = expected
    loras = _requests(paths)
    names = [None, "qv8", "kogate16", "all32"]
    # Every prompt under every adapter (and the base model), all in one generate call.
    jobs = [(p, name) for name in names for p in range(len(prompts))]
    random.Random(0).shuffle(jobs)
    llm = LLM(model, dtype="float32", enable_lora=True, max_lora_rank=32, **variant)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": prompts[p]} for p, _ in jobs], params, use_tqdm=False,
                        lora_request=[loras[n] if n else None for _, n in jobs])
    for (p, name), out in zip(jobs, outs):
        assert out.outputs[0].token_ids == want[name][p], (name, p)
        assert out.lora_request == out.outputs[0].lora_request == (loras[name] if name else None)  # vLLM's field
    core = llm.engine.core
    assert core.kv.num_free_blocks == core.kv.num_blocks
    assert all(n == 0 for n in core.scheduler.lora.users)
    from tessellm.lora.warmup import WARMUP_LORA_ID  # the warm-up's adapter left nothing behind

    assert WARMUP_LORA_ID not in core.scheduler.lora.slot_ids and not core.lora_store.ready(WARMUP_LORA_ID)
    if variant.get("kernel_warmup"):  # the cpu plan's one request, then one with the adapter
        assert llm.engine.warmup.requests == 2


def test_prefix_cache_keyed_by_adapter(lora_setup, expected):
    model, paths = lora_setup
    prompts, want = expected
    loras = _requests(paths)
    llm = LLM(model, dtype="float32", enable_lora=True, max_lora_rank=32, block_size=4)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    prompt = {"prompt_token_ids": prompts[3]}  # 20+ tokens: several full blocks

    def run(lora):
        return llm.generate(prompt, params, use_tqdm=False, lora_request=lora)[0]

    first = run(loras["all32"])
    other = run(loras["qv8"])  # same prompt, other adapter: no hit, its own tokens
    assert other.num_cached_tokens == 0
    assert first.outputs[0].token_ids == want["all32"][3]
    assert other.outputs[0].token_ids == want["qv8"][3]
    again = run(loras["all32"])  # the same adapter again: its own blocks are hit
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == want["all32"][3]
    base = run(None)
    assert base.num_cached_tokens == 0 and base.outputs[0].token_ids == want[None][3]


PATTERNS = {
    # q rank 4, v rank 16, k and o at r = 8; k's alpha differs on layer 1 only: the fused
    # q|k|v slot holds three scalings (folded into B against the slot's one)
    "patterns": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                 dict(lora_alpha=16, rank_pattern={"q_proj": 4, "v_proj": 16},
                      alpha_pattern={"layers.1.self_attn.k_proj": 64, "up_proj": 4})),
    "patterns-rslora": (8, ["q_proj", "v_proj", "gate_proj", "down_proj"],
                        dict(lora_alpha=16, use_rslora=True, rank_pattern={"down_proj": 32},
                             alpha_pattern={"gate_proj": 2})),
}


def test_rank_and_alpha_patterns_match_peft(lora_setup, tmp_path):
    from tests.lora.adapters import make_adapters

    model, _ = lora_setup
    paths = make_adapters(model, str(tmp_path), seed=11, specs=PATTERNS)
    prompts = _prompts(3)
    want = {n: peft_greedy(model, paths[n], prompts, MAX_NEW) for n in PATTERNS}
    base = peft_greedy(model, None, prompts, MAX_NEW)
    assert all(want[n] != base for n in PATTERNS)
    loras = {n: LoRARequest(n, i + 1, paths[n]) for i, n in enumerate(PATTERNS)}
    jobs = [(p, n) for n in PATTERNS for p in range(len(prompts))]
    with LLM(model, dtype="float32", enable_lora=True, max_lora_rank=32) as llm:
        outs = llm.generate([{"prompt_token_ids": prompts[p]} for p, _ in jobs],
                            SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True),
                            use_tqdm=False, lora_request=[loras[n] for _, n in jobs])
    assert [o.outputs[0].token_ids for o in outs] == [want[n][p] for p, n in jobs]


def test_removed_adapter_frees_its_slot_and_weights(lora_setup, expected):
    """``LLMEngine.remove_lora`` (what the server's unload tells the core): the adapter's slot
    and cached weights go; the next adapter gets the slot and its own tokens."""
    model, paths = lora_setup
    prompts, want = expected
    loras = _requests(paths)
    llm = LLM(model, dtype="float32", enable_lora=True, max_lora_rank=32, max_loras=1)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    prompt = {"prompt_token_ids": prompts[1]}
    core = llm.engine.core
    out = llm.generate(prompt, params, use_tqdm=False, lora_request=loras["qv8"])[0]
    assert out.outputs[0].token_ids == want["qv8"][1]
    assert core.scheduler.lora.slot_ids == [loras["qv8"].lora_int_id]
    llm.engine.remove_lora(loras["qv8"].lora_int_id)
    assert core.scheduler.lora.slot_ids == [None] and not core.lora_store.ready(loras["qv8"].lora_int_id)
    out = llm.generate(prompt, params, use_tqdm=False, lora_request=loras["all32"])[0]
    assert out.outputs[0].token_ids == want["all32"][1]
    assert core.scheduler.lora.slot_ids == [loras["all32"].lora_int_id]


def test_peft_reference_keeps_eos_as_ignore_eos_does(lora_setup, tmp_path):
    """peft_greedy means what ignore_eos=True means (EOS chosen, generation goes on): a copy of
    the model whose EOS is the adapter's third greedy token gives the same tokens both ways."""
    from tests.models.test_hf_greedy_reference import _with_eos

    model, paths = lora_setup
    prompt, lora = [5, 17, 42, 99, 3, 250], LoRARequest("qv8", 1, paths["qv8"])
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)

    def ours(path):
        with LLM(path, dtype="float32", enable_lora=True, max_lora_rank=32) as llm:
            out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False, lora_request=lora)
        return list(out[0].outputs[0].token_ids)

    eos = ours(model)[2]
    path = _with_eos(model, str(tmp_path / "eos"), eos)
    got = ours(path)
    assert eos in got and peft_greedy(path, paths["qv8"], [prompt], MAX_NEW) == [got]
