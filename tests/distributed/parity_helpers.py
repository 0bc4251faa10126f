"""Shared by the parallel parity tests (test_parallel_parity.py, test_spec_parallel.py): greedy
tokens of a prompt set, and the same from one process as the reference."""

from __future__ import annotations

from tessellm import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def greedy_tokens(llm, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def one_process_tokens(path: str, prompts: list[list[int]]) -> list[list[int]]:
    """The reference: the same prompts on one process (cpu, 64 KV blocks, seed 0)."""
    with LLM(path, device="cpu", num_kv_blocks=64, seed=0) as llm:
        return greedy_tokens(llm, prompts)
