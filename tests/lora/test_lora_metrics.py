"""vLLM's ``lora_requests_info`` (what the Gateway API Inference Extension's LoRA affinity reads)
on the real engine: the adapters of the running and of the waiting requests and the slots, in
one series whose value is when it was set; under ``vllm:`` with ``metrics_names="vllm"``."""

from __future__ import annotations

import time

from tessellm import LLM, SamplingParams
from tessellm.inputs import TokensPrompt
from tessellm.lora import LoRARequest
from tessellm.metrics.reader import Gauge


def _lora_info(llm) -> list[Gauge]:
    return [m for m in llm.get_metrics() if m.name == "vllm:lora_requests_info"]


def test_lora_requests_info_names_running_and_waiting_adapters(lora_setup):
    model, paths = lora_setup
    first, second = sorted(paths)[:2]
    params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0)
    with LLM(model, device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, enable_lora=True,
             max_loras=1, disable_log_stats=False, metrics_names="vllm") as llm:
        engine = llm.llm_engine
        for i, name in enumerate((first, second)):
            engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=[5, 9, 11]), params,
                               lora_request=LoRARequest(name, i + 1, paths[name]))
        began = time.time()
        while not any(o.outputs[0].token_ids for o in engine.step()):
            pass  # until the first adapter's request runs (its adapter loads first)
        (info,) = _lora_info(llm)  # one series: the previous label set is dropped
        assert info.labels == {"max_lora": "1", "running_lora_adapters": first,
                               "waiting_lora_adapters": second}  # one slot: the second waits
        assert began <= info.value <= time.time()
        while engine.has_unfinished_requests():
            engine.step()
        (info,) = _lora_info(llm)
        assert info.labels == {"max_lora": "1", "running_lora_adapters": "", "waiting_lora_adapters": ""}


def test_data_parallel_cores_adapters_merge():
    """-dp N: the whole engine's adapters are the cores' (each name once)."""
    from tessellm.metrics.stats import EngineStats, merge_engine_stats

    merged = merge_engine_stats([EngineStats(lora={"running": ["a"], "waiting": ["b"], "max_lora": 2}),
                                 EngineStats(lora={"running": ["c", "a"], "waiting": [], "max_lora": 2}),
                                 EngineStats()])
    assert merged.lora == {"running": ["a", "c"], "waiting": ["b"], "max_lora": 2}
