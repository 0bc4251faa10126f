"""LoRA under tensor parallelism (gloo, worker processes): A and B sharded like their base
layers, the row-parallel terms summed with the base's partial products; tokens equal peft."""

from __future__ import annotations

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
