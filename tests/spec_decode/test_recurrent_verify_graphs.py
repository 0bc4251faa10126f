"""Captured verify steps on models with recurrent states (``spec_decode/verify_graphs.py`` with
``MambaStateCache.verify_batch``): the state slots and token slots are graph inputs, padding
sequences run in the scratch slot, and the verify ops read only device tensors (here the cpu
backend's reference ops, whose composition builds its per-position indices on the device,
``reference/recurrent_verify.captured_positions``). A stand-in graph runner keeps static
buffers and calls the step on replay, as a device graph runner replays it (the same padding,
bucketing and buffer reuse; tests/spec_decode/test_verify_graphs.py does the same for dense
models). Greedy n-gram speculation on tiny Mamba2 and Qwen3-Next models in float32 gives the
tokens of decoding without it, with verify steps replayed, drafts accepted and rejected. On a
CUDA GPU the same with the cuda backend's own graphs and fused verify kernels (the ``gpu``
case, benchmarks/hverify_device.sh)."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.models.variant_parity import save_tiny
from tests.spec_decode.test_recurrent_spec import ENGINE, NGRAM, VOCAB, repetitive_prompts
from tests.spec_decode.test_verify_graphs import StandInGraphRunner


@pytest.fixture(autouse=True)
def _verify_graphs_on(monkeypatch):
    """Captured verify steps on recurrent-state models, the default (envs.recurrent_verify_graphs)."""
    monkeypatch.delenv("TESSELLM_RECURRENT_VERIFY_GRAPHS", raising=False)


SIZES = (2, 4)  # a step of one sequence replays the graph of two: one padding sequence
ARGS = dict(ENGINE, max_num_seqs=2)


def _generate(path, spec=None, stand_in=False, **engine):
    """Greedy tokens, spec stats and how many verify steps replayed a graph (``stand_in``: the
    stand-in runner's graphs captured after load; else the backend's own, if any)."""
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with LLM(path, speculative_config=spec, **{**ARGS, **engine}) as llm:
        core = llm.engine.core
        runner = core.runner
        if stand_in:
            runner.graph_runner = StandInGraphRunner(SIZES)
            runner.verify_graph_factory = StandInGraphRunner
            runner.capture_graphs()
        replays = []
        graphs = runner.verify_graphs
        if spec is not None:
            assert graphs is not None and set(graphs.runners) == {2, 3, 4}
            run = graphs.run
            graphs.run = lambda *a, **k: replays.append(1) or run(*a, **k)  # counted, then run
        outs = llm.generate([{"prompt_token_ids": p} for p in repetitive_prompts()], params,
                            use_tqdm=False)
        stats = core.scheduler.spec_stats.copy() if spec is not None else None
    return [list(o.outputs[0].token_ids) for o in outs], stats, len(replays)


def _model(tmp_path, family) -> str:
    if family == "mamba2":
        from tests.models.test_mamba2 import mamba2_config as make
    else:
        from tests.models.test_qwen3_next import qwen3_next_config as make
    return save_tiny(make(vocab_size=VOCAB), str(tmp_path / family))


@pytest.mark.parametrize("family", ["mamba2", pytest.param("qwen3_next", marks=pytest.mark.slow)])
def test_captured_verify_steps_give_the_plain_tokens(tmp_path, family):
    """(qwen3_next is slow, ~15 s: the runner's path is the same; its ops' composition under
    capture is the conformance suite's padded case)"""
    path = _model(tmp_path, family)
    want, _, _ = _generate(path)
    got, stats, replays = _generate(path, NGRAM, stand_in=True)
    assert got == want
    assert replays > 0, "no verify step was replayed from a graph"
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["mamba2", "qwen3_next"])
def test_cuda_verify_graphs_give_the_plain_tokens(tmp_path, monkeypatch, family):
    """The cuda backend's CUDA graphs (decode and verify, capture sizes 1..max_num_seqs) over
    its fused verify kernels (both switches at their defaults)."""
    monkeypatch.delenv("TESSELLM_RECURRENT_STATE_GRAPHS", raising=False)
    monkeypatch.delenv("TESSELLM_RECURRENT_VERIFY_GRAPHS", raising=False)
    path = _model(tmp_path, family)
    want, _, _ = _generate(path, device="cuda")
    got, stats, replays = _generate(path, NGRAM, device="cuda")
    assert got == want
    assert replays > 0, "no verify step was replayed from a graph"
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_verify_graphs_switch(monkeypatch):
    """Recurrent-state verify steps are captured by default (they ran on an H100); "0" keeps
    them eager."""
    from tessellm import envs

    monkeypatch.delenv("TESSELLM_RECURRENT_VERIFY_GRAPHS", raising=False)
    assert envs.recurrent_verify_graphs() is True
    monkeypatch.setenv("TESSELLM_RECURRENT_VERIFY_GRAPHS", "0")
    assert envs.recurrent_verify_graphs() is False


def test_own_verify_ops_are_not_captured_unless_declared():
    """A plugin's ops subclassing ReferenceOps with a verify op of its own (which may read the
    batch's host lists) does not inherit the reference's ``recurrent_verify_graphs``; the
    reference's own and a subclass that declares it are captured."""
    from tessellm.backends.reference.ops import ReferenceOps
    from tessellm.backends.reference import recurrent_verify
    from tessellm.backends.reference.recurrent_verify import verify_ops_capturable

    class OwnVerify(ReferenceOps):
        mamba_conv1d_verify = staticmethod(recurrent_verify.mamba_conv1d_verify)

    class OwnVerifyDeclared(ReferenceOps):
        mamba_conv1d_verify = staticmethod(recurrent_verify.mamba_conv1d_verify)
        recurrent_verify_graphs = True

    class OtherOps(ReferenceOps):  # no verify op of its own: the reference's, captured
        pass

    assert not verify_ops_capturable(OwnVerify())
    assert verify_ops_capturable(OwnVerifyDeclared())
    assert verify_ops_capturable(OtherOps())
    assert verify_ops_capturable(ReferenceOps())


def test_eager_verify_steps_reserve_no_verify_graphs(tmp_path, monkeypatch):
    """Verify steps kept eager on a recurrent-state model (TESSELLM_RECURRENT_VERIFY_GRAPHS=0):
    the graphs' reserve before the KV cache and their logits buffer are the decode graphs'
    alone, as captured (no verify graph's logits rows or activations)."""
    from tessellm.core.memory_profile import graph_memory_estimate

    monkeypatch.setenv("TESSELLM_RECURRENT_VERIFY_GRAPHS", "0")
    with LLM(_model(tmp_path, "mamba2"), speculative_config=NGRAM, **ARGS) as llm:
        runner = llm.engine.core.runner
        runner.logits_row_bytes = runner.vocab_size * 4  # (profile_run's, float32)
        runner.graph_runner = StandInGraphRunner(SIZES)
        runner.verify_graph_factory = StandInGraphRunner
        runner.kernel.supports_graph_capture = True
        per_token = runner.profile_peak_bytes / max(1, runner.profile_tokens)
        assert runner.graph_memory_estimate() == graph_memory_estimate(
            SIZES, runner.logits_row_bytes, per_token)
        with torch.inference_mode():
            runner.capture_graphs()
        assert runner.verify_graphs is None
        assert runner.graph_logits.shape[0] == max(SIZES)
