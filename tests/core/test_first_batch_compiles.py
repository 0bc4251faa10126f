"""A first real batch compiles nothing the engine's start left out (the serving warm-up's own
coverage is checked on the GPU: firstrun_device.sh's cold_warmup, 0 compiles after ready).

On an H100 the first workload-F run of a process took ~8.4 s against ~7 s for a later one
(benchmarks/firstrun.py measures it). What such a run still compiles is found here on the CPU:
the cuda backend runs emulated (Triton's interpreter), ``tests/triton_keys.py`` records each
launch's specialisation key as Triton's JIT would form it, and the engine's GPU start is
replayed: the memory-profiling forward at the step budget, then a stand-in graph runner's
capture of every decode batch size (as ``CudaGraphRunner`` runs the step before capturing it).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tessellm import LLM, SamplingParams
from tessellm.backends.cuda.graph_runner import default_capture_sizes
from tessellm.core.block_table import PersistentBlockTable
from tessellm.core.input_batch import RunnerRequest
from tessellm.core.input_builder import build_inputs
from tests.spec_decode.test_verify_graphs import StandInGraphRunner
from tests.triton_keys import record

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="needs TRITON_INTERPRET=1 (the launch spy)")
GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def test_eager_block_tables_are_padded_to_the_kernels_multiple():
    tables = PersistentBlockTable(40, rows=4)
    states = []
    for i, blocks in enumerate([list(range(3)), list(range(10, 27))]):
        row = tables.add(blocks)
        n = len(blocks) * 4
        states.append(RunnerRequest(f"r{i}", [1] * n, n, GREEDY, blocks, 0, row))
    host = build_inputs(states, [5, 7], None, tables, 4, None, width_multiple=16)
    assert host.block_table.shape == (2, 32)  # 17 blocks at most, rounded up to 32 columns
    assert host.block_table[1, :17].tolist() == list(range(10, 27))
    host = build_inputs(states, [5, 7], None, tables, 4, None)
    assert host.block_table.shape == (2, 17)
    tables.append(1, list(range(30, 50)))  # 37 blocks: rounded up past the table, so its width
    assert build_inputs(states, [5, 7], None, tables, 4, None, width_multiple=16).block_table.shape == (2, 40)
    assert np.array_equal(host.slot_mapping,
                          build_inputs(states, [5, 7], None, tables, 4, None, 16).slot_mapping)


def _gpu_start(llm, budget: int, max_num_seqs: int):
    """What the engine does on a GPU before ready that emulation skips: the profile forward at
    the step budget (it sizes the KV cache there) and the decode graphs' capture."""
    core = llm.engine.core
    worker = core.executor.worker
    runner = worker.runner
    runner.profile_run(budget)
    runner.graph_runner = StandInGraphRunner(default_capture_sizes(max_num_seqs))
    runner.kernel.supports_graph_capture = True  # the Triton kernel's; emulation turned graphs off
    worker.initialize_cache(core.info.num_kv_blocks)
    return core


def _f_like(llm, n: int, prompt_len: int, seed: int) -> None:
    """F's shape at a small scale: more prompts than one step's budget holds, so the later
    chunks ride with the first requests' decodes (mixed steps), then pure decode steps."""
    rng = np.random.default_rng(seed)
    prompts = [{"prompt_token_ids": rng.integers(10, 300, prompt_len).tolist()} for _ in range(n)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3] * n


@interpreted
def test_the_profile_run_compiles_greedy_sampling(tiny_model_dir):
    """``LLM(...)`` runs no kernel warm-up: its first greedy request sampled with an argmax
    variant nothing had launched. The profile forward now takes the argmax of its logits."""
    with LLM(tiny_model_dir("llama"), device="cuda", emulate=True, dtype="float32",
             max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64) as llm:
        core = llm.engine.core
        with record() as seen:
            core.executor.worker.runner.profile_run(32)  # (it frees the KV cache: allocated again)
            core.executor.worker.initialize_cache(core.info.num_kv_blocks)
            start = seen.snapshot()
            llm.generate([{"prompt_token_ids": [5, 17, 42, 99]}], GREEDY, use_tqdm=False)
    assert "sampling._chunk_argmax_kernel" in seen.names(start)
    assert not [k for k in seen.since(start) if k[0].startswith("sampling.")]


@pytest.mark.slow  # about 3 minutes of interpreted Triton on one loaded core
@interpreted
def test_a_first_batch_without_warmup_meets_the_start_variants(tiny_model_dir):
    """``LLM(...)`` (no kernel warm-up) after the GPU start: an F-shaped batch (20 prompts a
    step, a mixed step of 20 decodes beside 20 prompts, graph-replayed decodes) launches no
    kernel variant the profile forward and the capture did not. On an H100 the first F run
    compiled five (2.9 s of a 9.0 s run, benchmarks/results/h100-2026-12-06-s21/firstrun/): the
    prefill kernel for other ``seq_offset`` / block-table stride classes and the split-KV decode
    kernel for its mixed steps' tables, narrower than the capture's whole-width ones."""
    budget, seqs = 320, 40
    with LLM(tiny_model_dir("llama"), device="cuda", emulate=True, dtype="float32",
             max_num_batched_tokens=budget, max_num_seqs=seqs, max_model_len=256,
             num_kv_blocks=512) as llm:
        with record() as seen:
            _gpu_start(llm, budget, seqs)
            llm.generate([{"prompt_token_ids": [7] * 16}] * 2, GREEDY, use_tqdm=False)  # bench's tiny
            start = seen.snapshot()
            _f_like(llm, seqs, 16, seed=2)
    missed = seen.since(start)
    assert not missed, f"variants first launched by the batch: {missed}"
