"""Tensor and pipeline parallelism on GPUs (NCCL, CUDA graphs per rank): greedy tokens equal
to one GPU in float32. Needs at least two CUDA devices."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM

from test_parallel_parity import _tokens

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    path = tiny_model_dir("llama-sharp")
    with LLM(path, device="cuda", dtype="float32", num_kv_blocks=64, seed=0) as llm:
        return path, _tokens(llm)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_cuda_matches_one_gpu(reference, tp, pp):
    path, expected = reference
    with LLM(path, device="cuda", dtype="float32", num_kv_blocks=64, seed=0,
             tensor_parallel_size=tp, pipeline_parallel_size=pp, max_num_batched_tokens=24) as llm:
        info = llm.engine.core.executor.worker_info
        assert [i["device"] for i in info] == ["cuda:0", "cuda:1"]
        assert info[0]["graphs"] == (pp == 1)  # CUDA graphs (with NCCL inside) under TP
        assert _tokens(llm) == expected
