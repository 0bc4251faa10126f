"""MoE under tensor parallelism on the CPU with gloo (mp executor): each rank holds every
expert's slice of the intermediate dimension (``layers/moe.py``); greedy tokens equal HF's."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.conftest import hf_greedy
from tests.models.tiny_moe import prompts, save_tiny_moe

MAX_NEW = 24


@pytest.mark.parametrize("arch", ["qwen2-moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_moe_tp2_matches_hf(tmp_path, arch):
    path = save_tiny_moe(arch, str(tmp_path / arch))
    want = hf_greedy(path, prompts(), MAX_NEW)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    with LLM(path, device="cpu", dtype="float32", num_kv_blocks=64, seed=0,
             tensor_parallel_size=2) as llm:
        assert len(llm.engine.core.executor.worker_info) == 2
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
