"""Captured decode steps of the recurrent-state models (``core/runner_graphs.py``: the state
slots a graph input, padded rows in the cache's scratch slot) on the cpu backend's graph runner,
``torch.compile`` of the same ``_decode_step`` a GPU captures. The runner is held to one compiled
graph per bucket (1, 2, 4), as a device graph runner pads: 3 running requests replay the graph
of 4, whose padded row reads and writes the scratch slot. Greedy tokens equal HF's in float32,
with and without preemption. Nothing is mocked: the real model and ops run."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.models.recurrent_state import assert_preemption_rebuilds_states
from tests.models.test_granite_moe_hybrid import granite_hybrid_config
from tests.models.test_mamba2 import mamba2_config
from tests.models.test_qwen3_next import qwen3_next_config
from tests.models.variant_parity import hf_reference, prompts, save_tiny

ENGINE = dict(max_num_seqs=4, max_model_len=128, block_size=16)


@pytest.fixture
def bucketed_compile(monkeypatch):
    """The cpu backend's compiled decode step, one graph per capture size (padded batches)."""
    from tessellm.backends.cpu.graph_runner import CompiledDecodeRunner

    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "1")
    monkeypatch.setattr(CompiledDecodeRunner, "_reuses_graph", staticmethod(lambda *a: False))


CONFIGS = {"mamba2": mamba2_config, "granite4h": granite_hybrid_config,
           "qwen3next": qwen3_next_config}  # Mamba2 mixers; gated DeltaNet (gated_delta_step)
STATEFUL_LAYERS = {"mamba2": 2, "granite4h": 3, "qwen3next": 3}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request, tmp_path_factory):
    name = request.param
    return name, save_tiny(CONFIGS[name](), str(tmp_path_factory.mktemp(name)))


def test_padded_decode_graphs_match_hf(model, bucketed_compile):
    _, model_dir = model
    prompt_list = prompts((5, 13, 22), seed=11)  # 3 running requests: the graph of 4
    want, _ = hf_reference(model_dir, prompt_list, 10)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    with LLM(model_dir, dtype="float32", **ENGINE) as llm:
        runner = llm.engine.core.executor.worker.runner
        assert runner._graphs_ready and runner.graph_runner.capture_sizes == (1, 2, 4)
        assert not runner.graph_runner.exact_sizes
        cache = runner.mamba
        for layer in cache.layers:  # the scratch slot: what only padded rows write
            layer.conv_state[cache.scratch].zero_()
            layer.ssm_state[cache.scratch].zero_()
        sizes, run = [], runner.graph_runner.run
        runner.graph_runner.run = lambda x: sizes.append(len(x[0])) or run(x)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_list], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == want
        assert 4 in sizes and 3 not in sizes, sizes  # 3 decodes replayed the graph of 4
        assert any(layer.ssm_state[cache.scratch].abs().sum() > 0 for layer in cache.layers)
        assert cache.scratch not in cache.free and cache.scratch not in cache.slot_of.values()


def test_decode_graphs_after_preemption(model, bucketed_compile):
    """Preempted requests are recomputed eagerly, then decode in the graphs again."""
    name, model_dir = model
    assert_preemption_rebuilds_states(model_dir, STATEFUL_LAYERS[name], max_num_seqs=4,
                                      max_model_len=128)


def test_reference_conv1d_decodes_by_device_slots():
    """The reference conv1d's decodes read and write the slots of the device ``state_indices``
    (a captured step has no host slot list): the same as its host loop over prefill rows."""
    from tessellm.backends.reference.mamba import causal_conv1d
    from tessellm.backends.spec import MambaBatch
    from tessellm.core.mamba_state import make_batch

    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 6), torch.randn(6, 4), torch.randn(6)
    state = torch.randn(5, 6, 3)
    captured = make_batch([1, 1, 1], [4, 0, 2], torch.device("cpu"))
    captured.state_indices_host = []  # as MambaStateCache.decode_batch leaves it
    got_state = state.clone()
    got = causal_conv1d(x, weight, bias, got_state, captured)
    want_state = state.clone()  # the host loop: the same sequences, none marked a decode
    looped = MambaBatch(captured.query_start_loc, captured.state_indices, 0, [0, 1, 2, 3], [4, 0, 2])
    want = causal_conv1d(x, weight, bias, want_state, looped)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_state, want_state)


@pytest.mark.parametrize("value,want", [(None, True), ("0", False), ("1", True)])
def test_device_graphs_switch(monkeypatch, value, want):
    """On a GPU the recurrent-state models (Mamba2 mixers and Qwen3-Next's gated DeltaNet) replay
    decode graphs by default (both ran on an H100); "0" keeps them eager (envs.py)."""
    from tessellm.envs import recurrent_state_device_graphs

    if value is None:
        monkeypatch.delenv("TESSELLM_RECURRENT_STATE_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("TESSELLM_RECURRENT_STATE_GRAPHS", value)
    assert recurrent_state_device_graphs() is want
