"""On a CUDA GPU: the decode micro-batch overlap (``TESSELLM_DECODE_OVERLAP=1``) with its two
streams, in captured graphs and in eager steps, gives HF's greedy tokens in float32 (bf16 at
Llama-3.1-8B shapes: ``benchmarks/decode_overlap_step.py`` compares the logits)."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.conftest import hf_greedy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# 40 prompts: decode batches up to 40 rows (graph size 40, micro-batches of 20)
PROMPTS = [[(7 * i + 3 * j) % 384 for j in range(5 + (i * 13) % 70)] for i in range(40)]
MAX_NEW = 12


def _on(monkeypatch) -> None:
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP", "1")
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP_MIN_ROWS", "2")


def _generate(path: str, enforce_eager: bool, overlap: bool):
    """Greedy tokens of one engine (its KV cache kept small: two engines in turn) and the
    name of its overlap streams (None: off)."""
    llm = LLM(path, device="cuda", dtype="float32", enforce_eager=enforce_eager, num_kv_blocks=1024)
    runner = llm.engine.core.runner
    assert (runner.graph_runner is None) == enforce_eager
    assert (runner.overlap is not None) == overlap
    streams = type(runner.overlap.streams).__name__ if overlap else None
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    llm.shutdown()
    return [o.outputs[0].token_ids for o in outs], streams


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_fp32_split_decode_matches_hf(tiny_model_dir, monkeypatch, enforce_eager):
    path = tiny_model_dir("llama-sharp")
    want = hf_greedy(path, PROMPTS, MAX_NEW, device="cuda")
    off, _ = _generate(path, enforce_eager, overlap=False)
    _on(monkeypatch)
    on, streams = _generate(path, enforce_eager, overlap=True)
    assert streams == "CudaOverlapStreams"
    assert on == want, ("the split path parts from HF; the unsplit path "
                        + ("does not" if off == want else "does too (a near-tie?)"))
    assert on == off
