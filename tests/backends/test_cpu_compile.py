"""The cpu backend's compiled decode step (``torch.compile``, opt-in with TESSELLM_CPU_COMPILE):
greedy tokens equal eager ones in float32, ``run`` never compiles, the conformance graph tests
pass with it, and the padded cache write leaves the cache untouched for slot -1 rows."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tessellm.backends.cpu.attention import _write_cache_padded
from tessellm.backends.cpu.graph_runner import CompiledDecodeRunner, cpu_capture_sizes
from tessellm.backends.registry import get_registry
from tessellm.backends.spec import GraphSpec
from tessellm.testing.harness import greedy_tokens

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Five prompts through four sequence slots: decode batches of 4, 3 (padded to 4), 2 and 1.
PROMPTS = [[1, 17, 33, 5], [2] + list(range(40, 75)), [3, 9] * 11, list(range(100, 120)),
           list(range(100, 120)) + [7, 8, 9]]
ENGINE = dict(device="cpu", dtype="float32", block_size=16, num_kv_blocks=48, max_model_len=128,
              max_num_seqs=4, max_num_batched_tokens=32, seed=0)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_decode_greedy_equals_eager(tiny_llama, monkeypatch):
    from tessellm import LLM

    eager = greedy_tokens(LLM(tiny_llama, enforce_eager=True, **ENGINE), PROMPTS, 12)
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "1")
    llm = LLM(tiny_llama, **ENGINE)
    runner = llm.engine.core.runner
    assert isinstance(runner.graph_runner, CompiledDecodeRunner) and runner._graphs_ready
    assert runner.graph_runner.capture_sizes == (1, 2, 4)
    assert runner.graph_runner.exact_sizes  # one graph for batch >= 2: no padding rows
    assert [runner.graph_runner.padded_size(n) for n in (1, 3, 4, 5)] == [1, 3, 4, None]
    graphs, sizes, run = _unique_graphs(), [], runner.graph_runner.run
    monkeypatch.setattr(runner.graph_runner, "run", lambda x: sizes.append(len(x[0])) or run(x))
    assert greedy_tokens(llm, PROMPTS, 12) == eager
    assert _unique_graphs() == graphs, "a decode step compiled after capture"
    assert {1, 4} <= set(sizes), sizes  # the compiled step ran


def test_cpu_graph_runner_is_opt_in(monkeypatch):
    registry = get_registry()
    cpu = registry.backends["cpu"]
    monkeypatch.delenv("TESSELLM_CPU_COMPILE", raising=False)
    assert registry.graph_runner(cpu, GraphSpec(max_num_seqs=8)) is None
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "0")
    assert registry.graph_runner(cpu, GraphSpec(max_num_seqs=8)) is None
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "1")
    runner = registry.graph_runner(cpu, GraphSpec(max_num_seqs=8))
    assert isinstance(runner, CompiledDecodeRunner) and runner.capture_sizes == (1, 2, 4, 8)
    assert registry.graph_runner(cpu, GraphSpec(max_num_seqs=8, enforce_eager=True)) is None
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="TESSELLM_CPU_COMPILE='sometimes' is not understood"):
        registry.graph_runner(cpu, GraphSpec(max_num_seqs=8))


def test_cpu_capture_sizes():
    assert cpu_capture_sizes(1) == (1,)
    assert cpu_capture_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert cpu_capture_sizes(256)[-2:] == (128, 256)


def test_padded_cache_write_skips_slot_minus_one():
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(4, 2, 1, 3, generator=g)  # 4 blocks of 2 slots
    v_cache = torch.randn(4, 2, 1, 3, generator=g)
    k, v = torch.randn(4, 1, 3, generator=g), torch.randn(4, 1, 3, generator=g)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([5, -1, 2, -1])
    want_k.view(-1, 1, 3)[[5, 2]] = k[[0, 2]]
    want_v.view(-1, 1, 3)[[5, 2]] = v[[0, 2]]
    _write_cache_padded(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    # A batch of padding only: nothing changes.
    _write_cache_padded(k, v, k_cache, v_cache, torch.full((4,), -1))
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_conformance_graph_tests_pass_compiled():
    env = {**os.environ, "TESSELLM_CPU_COMPILE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tessellm.testing", "--backend", "cpu", "-q",
                           "-k", "graph and not lora"], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout and "skipped" not in proc.stdout


@pytest.mark.slow
def test_compiled_decode_greedy_equals_eager_on_bundled_model(monkeypatch):
    """SmolLM2-135M in float32: minutes of compilation on two cores, hence ``slow``."""
    from tessellm import LLM

    prompts = [list(range(1000 + 7 * i, 1000 + 7 * i + 20 + 9 * i)) for i in range(6)]
    engine = dict(device="cpu", dtype="float32", max_model_len=512, max_num_seqs=8, seed=0)
    eager = greedy_tokens(LLM(enforce_eager=True, **engine), prompts, 24)
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "1")
    llm = LLM(**engine)
    assert isinstance(llm.engine.core.runner.graph_runner, CompiledDecodeRunner)
    assert greedy_tokens(llm, prompts, 24) == eager
