"""Pooling under tensor parallelism (CPU, gloo, real worker processes): the final hidden states
are whole on every rank, and the pooled vectors cross from the workers through the step codec
(ModelRunnerOutput.pooled); they equal HF's, and so do a classifier's probabilities (its score
head is whole on every rank). Pipeline stages are refused by name."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM
from tests.pooling.conftest import hf_embeddings, hf_logits, random_prompts


@pytest.mark.parametrize("kind,pooling", [("qwen3", "MEAN"), ("llama-bare", "LAST")])
def test_tensor_parallel_embeddings_equal_hf(kind, pooling, tiny_model_dir, bare_model_dir):
    family, _, form = kind.partition("-")
    path = bare_model_dir(family) if form else tiny_model_dir(family)
    prompts = random_prompts(6, seed=21)
    with LLM(path, device="cpu", runner="pooling", num_kv_blocks=64, max_num_batched_tokens=32,
             tensor_parallel_size=2, pooler_config={"pooling_type": pooling}) as llm:
        assert len(llm.engine.core.executor.worker_info) == 2
        got = torch.tensor([o.outputs.embedding for o in llm.embed([{"prompt_token_ids": p} for p in prompts])])
    torch.testing.assert_close(got, hf_embeddings(path, prompts, pooling), atol=2e-5, rtol=0)


def test_tensor_parallel_classify_equals_hf(classifier_dir):
    path = classifier_dir("llama", 3)
    prompts = random_prompts(5, seed=22)
    with LLM(path, device="cpu", num_kv_blocks=64, max_num_batched_tokens=32, tensor_parallel_size=2) as llm:
        got = torch.tensor([o.outputs.probs for o in llm.classify([{"prompt_token_ids": p} for p in prompts])])
    torch.testing.assert_close(got, torch.softmax(hf_logits(path, prompts), -1), atol=2e-5, rtol=0)


def test_pipeline_parallel_pooling_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="pipeline_parallel_size does not apply to a pooling"):
        LLM(tiny_model_dir("qwen3"), device="cpu", runner="pooling", pipeline_parallel_size=2)
