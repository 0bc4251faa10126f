"""LoRA under data parallelism (``LLM(data_parallel_size=2)``): an adapter's requests run on
both engine cores with peft's tokens, and ``remove_lora`` reaches every core: the same id and
path named again after the files changed serve the new weights on both cores."""

from __future__ import annotations

import shutil

from tessellm import LLM, SamplingParams
from tessellm.lora import LoRARequest
from tests.lora.adapters import peft_greedy

# Four 150-token prompts with no full block in common, sent at once. The load balancer counts
# the requests a core has not received yet as queued there, and lets an adapter's requests
# gather on one core only while its score is within two of the other's: they alternate.
PROMPTS = [[3 + (31 * i + 97 * j) % 297 for j in range(150)] for i in range(4)]


def test_adapter_runs_on_every_core_and_unload_reaches_them(lora_setup, tmp_path):
    model, paths = lora_setup
    path = str(tmp_path / "adapter")
    shutil.copytree(paths["qv8"], path)
    lora = LoRARequest("retrained", 1, path)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    llm = LLM(model, device="cpu", dtype="float32", num_kv_blocks=64, data_parallel_size=2,
              enable_lora=True, max_lora_rank=32, max_loras=1, enable_prefix_caching=False)
    try:
        before = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False, lora_request=lora)]
        sent = llm.engine.requests_sent()
        assert min(sent) > 0, sent  # both cores loaded and ran the adapter
        llm.engine.remove_lora(1)
        shutil.rmtree(path)
        shutil.copytree(paths["kogate16"], path)
        after = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False, lora_request=lora)]
        assert min(s2 - s1 for s1, s2 in zip(sent, llm.engine.requests_sent())) > 0
    finally:
        llm.shutdown()
    assert before == peft_greedy(model, paths["qv8"], PROMPTS, 6)
    assert after == peft_greedy(model, paths["kogate16"], PROMPTS, 6) != before
