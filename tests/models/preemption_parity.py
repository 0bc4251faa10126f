"""Greedy tokens equal to HF transformers' while the scheduler preempts: a KV cache too small
for every request at once (the hybrid models' tests: a preempted request's state slot is freed
and its state rebuilt from its first token)."""

from __future__ import annotations

from tessellm import LLM, SamplingParams
from tests.models.variant_parity import hf_reference, prompts


def assert_parity_under_preemption(path: str, seed: int = 7, max_new: int = 16) -> None:
    prompt_list = prompts((20, 24, 28, 30), seed=seed)
    want, _ = hf_reference(path, prompt_list, max_new)
    params = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True)
    with LLM(path, dtype="float32", num_kv_blocks=24, block_size=4) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_list], params, use_tqdm=False)
        assert llm.engine.core.scheduler.num_preemptions_total > 0, \
            "the tiny cache should force preemption"
    assert [list(o.outputs[0].token_ids) for o in outs] == want
