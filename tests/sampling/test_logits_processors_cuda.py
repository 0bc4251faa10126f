"""On a CUDA GPU: custom logits processors (vLLM v1's interface) beside what the CPU suite
cannot reach: decode steps replayed from CUDA graphs (the graphs write one shared logits buffer
the processors then edit), async scheduling (step N+1 launched before step N's tokens are read)
and the decode overlap's two streams. vLLM's DummyLogitsProcessor forces its target token on
the rows that ask for it; the other rows' greedy tokens equal an engine's without processors in
float32; a processor that raises fails its step's requests only and the engine goes on."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.sampling.logits_procs import DummyLogitsProcessor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROCS = "tests.sampling.logits_procs"
# 24 prompts of 3-40 tokens: decode batches of up to 24 rows, replayed from graphs
PROMPTS = [[(11 * i + 5 * j) % 383 + 1 for j in range(3 + (i * 7) % 38)] for i in range(24)]
MAX_NEW = 10
ENGINE = dict(device="cuda", dtype="float32", seed=0, num_kv_blocks=512)


def _params(i: int, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, extra_args=extra or None)


def _run(path: str, params: list[SamplingParams], **kwargs) -> list:
    with LLM(path, **ENGINE, **kwargs) as llm:
        assert llm.engine.core.runner.graph_runner is not None  # decode steps replay graphs
        return llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def plain(llama):
    return [list(o.outputs[0].token_ids) for o in _run(llama, [_params(i) for i in range(len(PROMPTS))])]


def _targets() -> dict[int, int]:
    """Every third request asks for a target token (distinct ones)."""
    return {i: 17 + i for i in range(0, len(PROMPTS), 3)}


@pytest.mark.parametrize("kwargs", [dict(), dict(async_scheduling=True),
                                    dict(enable_decode_overlap=True, decode_overlap_steps="all",
                                         decode_overlap_min_batch=2)],
                         ids=["graphs", "async", "overlap"])
def test_targets_forced_and_other_rows_unchanged_under_graphs(llama, plain, kwargs):
    targets = _targets()
    params = [_params(i, target_token=targets[i]) if i in targets else _params(i) for i in range(len(PROMPTS))]
    out = _run(llama, params, logits_processors=[DummyLogitsProcessor], **kwargs)
    for i, o in enumerate(out):
        want = [targets[i]] * MAX_NEW if i in targets else plain[i]
        assert list(o.outputs[0].token_ids) == want, (i, kwargs)


def test_a_raising_processor_fails_its_step_and_the_engine_goes_on(llama, plain):
    with LLM(llama, **ENGINE, async_scheduling=True,
             logits_processors=[f"{PROCS}:RaisingProcessor"]) as llm:
        failed = llm.generate([{"prompt_token_ids": PROMPTS[0]}], _params(0, boom=True), use_tqdm=False)
        assert failed[0].outputs[0].finish_reason == "error"
        assert "RaisingProcessor raised in apply" in failed[0].outputs[0].stop_reason
        after = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                             [_params(i) for i in range(len(PROMPTS))], use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in after] == plain
