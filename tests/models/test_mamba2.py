"""Mamba2 (``Mamba2ForCausalLM``) on tiny random models: greedy tokens and per-token
log-probabilities equal HF transformers' in float32 (its torch path), for several concurrent
requests of different lengths (scan chunks of 8 tokens: prompts span several), under chunked
prefill (chunk boundaries inside prompts: the states carry over), and under preemption (the
recomputed request rebuilds its state). The engine runs the real model and ops; nothing is
mocked."""

from __future__ import annotations

import pytest

from tessellm import LLM
from tests.models.recurrent_state import (assert_preemption_rebuilds_states,
                                          assert_refused_on_ops_without)
from tests.models.variant_parity import assert_parity, assert_refused_at_load, prompts, save_tiny


def mamba2_config(**overrides):
    from transformers import Mamba2Config

    return Mamba2Config(**{"vocab_size": 128, "hidden_size": 64, "num_heads": 8, "head_dim": 16,
                           "expand": 2, "n_groups": 2, "state_size": 16, "conv_kernel": 4,
                           "chunk_size": 8, "num_hidden_layers": 2, "initializer_range": 0.2,
                           "tie_word_embeddings": False, **overrides})


def hf_norms_each_group(config) -> bool:
    """Whether the installed transformers' gated RMSNorm of this Mamba config normalizes each
    of its ``n_groups`` channel groups alone, as mamba_ssm's ``RMSNormGated(group_size=I / G)``
    and tessellm do (transformers 5.2x), or all ``I`` channels at once (5.17 and before: a
    reference that differs from the real model wherever ``n_groups > 1``). Checked on the
    model's own norm: halves of the channels at scales 10 and 1 come out all ones only when
    each group is normed alone."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    norm = next(m for m in model.modules() if type(m).__name__.endswith("RMSNormGated"))
    width = norm.weight.shape[0]
    y = torch.ones(1, width)
    y[:, :width // 2] = 10.0
    with torch.no_grad():
        norm.weight.fill_(1.0)
        out = norm(y)
    return torch.allclose(out, torch.ones_like(out), atol=1e-3)


@pytest.fixture(scope="module")
def mamba2_dir(tmp_path_factory):
    return save_tiny(mamba2_config(), str(tmp_path_factory.mktemp("mamba2")))


@pytest.mark.parametrize("engine", [dict(), dict(max_num_batched_tokens=8)],
                         ids=["whole-prompts", "chunked-prefill"])
def test_mamba2_matches_hf(mamba2_dir, engine):
    assert_parity(mamba2_dir, prompts((1, 5, 21, 30)), max_new=12, **engine)


def test_mamba2_tied_without_conv_bias(tmp_path):
    """The config switches: tied embeddings, no conv bias."""
    path = save_tiny(mamba2_config(tie_word_embeddings=True, use_conv_bias=False), str(tmp_path / "m"))
    assert_parity(path, prompts((9, 17)), max_new=8)


def test_mamba2_refuses_a_dt_clamp(tmp_path):
    """HF clamps dt to time_step_limit in prefill but not in decode: refused, not guessed."""
    assert_refused_at_load(mamba2_config(time_step_limit=(0.05, 0.6)), "Mamba2ForCausalLM",
                           tmp_path, "time_step_limit=.*not supported")


def test_mamba2_preemption_recomputes_the_state(mamba2_dir):
    """The preempted request's slot is freed and its state rebuilt from its first token."""
    assert_preemption_rebuilds_states(mamba2_dir, stateful_layers=2)


@pytest.mark.parametrize("groups", [1, 2])
def test_mamba2_tensor_parallel(groups, tmp_path):
    """tensor_parallel_size=2 (gloo): each rank holds half the heads; with n_groups 2 half the
    groups, with n_groups 1 the group replicated and the gated norm's sum of squares summed
    over the ranks."""
    path = save_tiny(mamba2_config(n_groups=groups), str(tmp_path / f"g{groups}"))
    assert_parity(path, prompts((5, 21)), max_new=8, tensor_parallel_size=2, device="cpu",
                  max_num_batched_tokens=16)


def test_mamba2_async_scheduling_with_preemption(mamba2_dir):
    """Async scheduling (the GPU default): a request's next chunk or decode is launched before
    its last step's tokens are read, and a request preempted while its step runs is recomputed;
    the state slots follow the runner's launches, so the tokens are HF's."""
    assert_preemption_rebuilds_states(mamba2_dir, 2, device="cpu", max_num_batched_tokens=16,
                                      async_scheduling=True)


def test_mamba2_refuses_what_a_recurrent_state_cannot_do(mamba2_dir):
    with pytest.raises(ValueError, match="Mamba layers do not run on backend 'tpu' yet"):
        LLM(mamba2_dir, dtype="float32", device="tpu", emulate=True)
    with pytest.raises(ValueError, match="does not support quantization gguf yet"):
        LLM(mamba2_dir, dtype="float32", quantization="gguf")


def test_mamba2_refused_on_ops_without_the_flag(mamba2_dir):
    """A plugin's fused ops written before API 7 (no ``supports_mamba2``): the model is refused
    at load naming the flag, instead of failing inside its first step."""
    assert_refused_on_ops_without(mamba2_dir, "supports_mamba2",
                                  "Mamba2 layers.*do not declare supports_mamba2")
