"""LoRA under tensor parallelism (gloo, worker processes): A and B sharded like their base
layers, the row-parallel terms summed with the base's partial products; tokens equal peft."""

from __future__ import annotations

import shutil

import pytest

from tessellm import LLM, SamplingParams
from tessellm.lora import LoRARequest
from tests.lora.adapters import peft_greedy

PROMPTS = [[5, 17, 42, 99, 3, 250], [7, 7, 7], [300, 12, 9, 1, 44]]


@pytest.mark.slow
def test_tensor_parallel_lora_matches_peft(lora_setup):
    model, paths = lora_setup
    names = ["all32", None, "kogate16"]  # all32 adapts o_proj and down_proj (row-parallel)
    loras = {"all32": LoRARequest("all32", 1, paths["all32"]),
             "kogate16": LoRARequest("kogate16", 2, paths["kogate16"])}
    llm = LLM(model, device="cpu", dtype="float32", num_kv_blocks=64, tensor_parallel_size=2,
              enable_lora=True, max_lora_rank=32, max_loras=2)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                            use_tqdm=False, lora_request=[loras.get(n) for n in names])
    finally:
        llm.shutdown()
    for out, prompt, name in zip(outs, PROMPTS, names):
        want = peft_greedy(model, paths[name] if name else None, [prompt], 6)[0]
        assert out.outputs[0].token_ids == want, name


@pytest.mark.parametrize("tp", [1, 2])
def test_unloaded_adapter_is_dropped_on_every_rank(lora_setup, tmp_path, tp):
    """remove_lora reaches the worker processes: each rank drops its host copy, so the same id
    and path named again after the files changed (an adapter retrained in place) serves the
    new weights on every rank, not the copy the ranks read first. (Prefix caching off: cached
    KV blocks stay keyed on the adapter id, tessellm.lora.store.AdapterStore.claim.)"""
    model, paths = lora_setup
    path = str(tmp_path / "adapter")
    shutil.copytree(paths["qv8"], path)
    lora = LoRARequest("retrained", 1, path)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompt = {"prompt_token_ids": PROMPTS[0]}
    llm = LLM(model, device="cpu", dtype="float32", num_kv_blocks=64, tensor_parallel_size=tp,
              enable_lora=True, max_lora_rank=32, max_loras=1, enable_prefix_caching=False)
    try:
        before = llm.generate(prompt, params, use_tqdm=False, lora_request=lora)[0].outputs[0].token_ids
        llm.engine.remove_lora(1)
        shutil.rmtree(path)
        shutil.copytree(paths["kogate16"], path)
        after = llm.generate(prompt, params, use_tqdm=False, lora_request=lora)[0].outputs[0].token_ids
    finally:
        llm.shutdown()
    assert before == peft_greedy(model, paths["qv8"], [PROMPTS[0]], 6)[0]
    assert after == peft_greedy(model, paths["kogate16"], [PROMPTS[0]], 6)[0] != before
