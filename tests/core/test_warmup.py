"""The warm-up (tessellm/core/warmup.py) drives a real engine core through every path of its plan
and leaves it as it found it: idle, every KV block free, no prefix-cache statistics, same tokens."""

from __future__ import annotations

from types import SimpleNamespace

from tessellm import LLM, SamplingParams
from tessellm.core import warmup

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5, 17, 42, 99, 3, 250]}, {"prompt_token_ids": [7, 7, 7]}]


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_full_plan_runs_and_leaves_nothing_behind(tiny_model_dir):
    with LLM(tiny_model_dir("llama"), device="cpu", num_kv_blocks=128, block_size=8,
             max_model_len=256, kernel_warmup=True) as llm:
        assert llm.engine.warmup.requests >= 1  # kernel_warmup=True: the cpu plan ran at start
        before = _tokens(llm)
        core = llm.engine.core
        plan = warmup.WarmupPlan(prefill_lens=[1, 15, 16, 17, 33], decode_batches=[1, 2, 4],
                                 samplers=warmup.sampler_variants(core.vocab_size),
                                 prefix_hit_len=19, chunked_len=None)
        report = warmup.run(core, plan)
        assert report.requests == 5 + 5 + 2 + (1 + 2 + 4 + 3) + 2 * len(plan.samplers)
        assert not core.has_unfinished_requests()
        assert core.kv.num_free_blocks == core.kv.num_blocks
        stats = core.scheduler.stats()
        assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (0, 0)
        assert _tokens(llm) == before


def test_gpu_plan_covers_the_shapes():
    core = SimpleNamespace(scheduler=SimpleNamespace(config=SimpleNamespace(max_num_batched_tokens=16384,
                                                                            max_num_seqs=256)),
                           info=SimpleNamespace(num_kv_blocks=30000, block_size=16),
                           max_model_len=131072, vocab_size=128256,
                           backend=SimpleNamespace(device_type="cuda"))
    plan = warmup.plan_for(core)
    assert {1, 15, 16, 17, 2047, 2048, 2049, 16384} <= set(plan.prefill_lens)
    assert plan.decode_batches == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert plan.chunked_len == 16384 + 64  # a prompt over the step budget: chunked prefill
    assert len(plan.samplers) == 7
    assert warmup.enabled(SimpleNamespace(kernel_warmup=None), serving=True)
    assert not warmup.enabled(SimpleNamespace(kernel_warmup=None), serving=False)


def test_tensor_parallel_workers_count_compilations_after_ready(tiny_model_dir):
    """Each TP worker process counts its own Triton compilations from the end of warm-up (the
    core's /metrics adds what the ranks report)."""
    with LLM(tiny_model_dir("llama"), device="cpu", num_kv_blocks=64, block_size=8,
             max_model_len=128, tensor_parallel_size=2, kernel_warmup=True) as llm:
        executor = llm.engine.core.executor
        counts = executor.collective_rpc("compile_counts")
        assert [c["ready"] for c in counts] == [True, True]
        assert [c["after_ready"] for c in counts] == [0, 0]  # the cpu path compiles nothing
        assert len(_tokens(llm)) == 2
        assert executor.worker_compilations_after_ready() == 0
