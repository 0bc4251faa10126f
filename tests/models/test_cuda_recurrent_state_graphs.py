"""On a CUDA GPU: Mamba2 and Granite 4.0-H decode through captured CUDA graphs (the state slots
a graph input, padded rows in the scratch slot: ``core/runner_graphs.py``) and eagerly
(``enforce_eager``); greedy tokens equal HF's in float32 either way, with batches padded to a
graph size (5 requests through 4 sequence slots: decode batches of 4, 3 -> 4, 2, 1) and after
preemption. The decode step's time, graphs on and off, is benchmarks/recurrent_state_graphs.py."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.models.recurrent_state import assert_preemption_rebuilds_states
from tests.models.test_granite_moe_hybrid import granite_hybrid_config
from tests.models.test_mamba2 import hf_norms_each_group, mamba2_config
from tests.models.variant_parity import hf_reference, prompts, save_tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STATEFUL_LAYERS = {"mamba2": 2, "granite4h": 3}


@pytest.fixture(scope="module", params=sorted(STATEFUL_LAYERS))
def model(request, tmp_path_factory):
    config = mamba2_config() if request.param == "mamba2" else granite_hybrid_config()
    if not hf_norms_each_group(config):  # older HF norms all groups at once: test_cuda_families.py
        config = (mamba2_config(n_groups=1) if request.param == "mamba2"
                  else granite_hybrid_config(mamba_n_groups=1))
    return request.param, save_tiny(config, str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(autouse=True)
def _device_graphs_on(monkeypatch):
    monkeypatch.delenv("TESSELLM_RECURRENT_STATE_GRAPHS", raising=False)  # on by default (envs.py)


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_fp32_greedy_matches_hf(model, enforce_eager):
    _, path = model
    prompt_list = prompts((1, 5, 21, 30, 9), seed=7)
    want, _ = hf_reference(path, prompt_list, 12)
    with LLM(path, device="cuda", dtype="float32", enforce_eager=enforce_eager, max_num_seqs=4,
             max_model_len=128) as llm:
        runner = llm.engine.core.runner
        sizes = []
        if enforce_eager:
            assert runner.graph_runner is None
        else:
            assert runner._graphs_ready and runner.graph_runner.padded_size(3) == 4
            run = runner.graph_runner.run
            runner.graph_runner.run = lambda x: sizes.append(len(x[0])) or run(x)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_list],
                            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                            use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    if not enforce_eager:
        assert 4 in sizes and 3 not in sizes, sizes  # replayed, and 3 decodes padded to 4


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_preemption_rebuilds_states(model, enforce_eager):
    name, path = model
    assert_preemption_rebuilds_states(path, STATEFUL_LAYERS[name], device="cuda",
                                      enforce_eager=enforce_eager, max_num_seqs=4,
                                      max_model_len=128)
