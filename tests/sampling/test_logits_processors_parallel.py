"""Custom logits processors on the parallel engines (tiny random llama with a real tokenizer,
cpu, float32, gloo): each data-parallel engine core, the last pipeline stage of the mp and Ray
executors build the processors from their names, force the target on the rows that ask for it
and leave the others' greedy tokens equal to one plain engine's; a data-parallel core refuses a
request its processors' ``validate_params`` refuse."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams

ENGINE = dict(device="cpu", dtype="float32", seed=0, block_size=4, num_kv_blocks=128)
PROMPTS = ["Hello, my name is", "The president of the United States is", "The capital of France is",
           "The future of AI is"]
DUMMY = "tests.sampling.logits_procs:DummyLogitsProcessor"


def _greedy(max_tokens=8, **extra_args) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args or None)


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


PARAMS = [_greedy(6, target_token=128), _greedy(8), _greedy(6, target_token=67), _greedy(8)]


@pytest.fixture(scope="module")
def expected(tokenized_model):
    """The forced rows' target, the others' tokens from one engine without processors."""
    with LLM(tokenized_model, **ENGINE) as llm:
        plain = _tokens(llm.generate(PROMPTS, _greedy(8), use_tqdm=False))
    return [[128] * 6, plain[1], [67] * 6, plain[3]]


def test_every_data_parallel_core_applies_the_processors(tokenized_model, expected):
    with LLM(tokenized_model, **ENGINE, data_parallel_size=2, logits_processors=[DUMMY]) as llm:
        assert _tokens(llm.generate(PROMPTS * 2, PARAMS * 2, use_tqdm=False)) == expected * 2
        with pytest.raises(ValueError, match="target_token must be a non-negative integer.*DummyLogitsProcessor"):
            llm.generate(PROMPTS[0], _greedy(4, target_token=-1), use_tqdm=False)
        assert _tokens(llm.generate(PROMPTS[:2], PARAMS[:2], use_tqdm=False)) == expected[:2]


def test_the_last_pipeline_stage_applies_the_processors(tokenized_model, expected):
    with LLM(tokenized_model, **ENGINE, pipeline_parallel_size=2, logits_processors=[DUMMY]) as llm:
        assert type(llm.engine.core.executor).__name__ == "MultiprocExecutor"
        assert len(llm.engine.core.executor.worker_info) == 2
        assert _tokens(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == expected


def test_the_ray_executor_applies_the_processors(tokenized_model, expected):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with LLM(tokenized_model, **ENGINE, pipeline_parallel_size=2, distributed_executor_backend="ray",
                 logits_processors=[DUMMY]) as llm:
            assert type(llm.engine.core.executor).__name__ == "RayExecutor"
            assert _tokens(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == expected
    finally:
        ray.shutdown()
