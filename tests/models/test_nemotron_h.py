"""Nemotron-H (``NemotronHForCausalLM``) on tiny random models: Mamba2, attention (no
positions), relu2 MLP and MoE layers from the layer pattern. Greedy tokens and per-token
log-probabilities equal HF transformers' in float32 for concurrent requests of different
lengths, under chunked prefill (chunk boundaries inside prompts: the Mamba states and the KV
cache both carry over) and under preemption. Nothing is mocked."""

from __future__ import annotations

import pytest

from tests.models.preemption_parity import assert_parity_under_preemption
from tests.models.variant_parity import assert_parity, assert_refused_at_load, prompts, save_tiny


def nemotron_config(**overrides):
    from transformers import NemotronHConfig

    return NemotronHConfig(**{
        "vocab_size": 128, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "intermediate_size": 96, "max_position_embeddings": 128,
        "layers_block_type": ["linear_attention", "full_attention", "mlp", "moe",
                              "linear_attention"],
        # mamba_num_heads * mamba_head_dim (96) is not 2 * hidden_size, as in Nemotron Nano 2
        "mamba_num_heads": 6, "mamba_head_dim": 16, "n_groups": 2, "ssm_state_size": 16,
        "conv_kernel": 4, "chunk_size": 8, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5,
        "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 48,
        "initializer_range": 0.2, "tie_word_embeddings": False, **overrides})


def _with_router_bias(path: str) -> str:
    """HF initializes e_score_correction_bias to zeros: give it values that steer routing."""
    import os

    import torch
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(1)
    for name in tensors:
        if name.endswith("e_score_correction_bias"):
            tensors[name] = torch.rand(tensors[name].shape, generator=gen) * 0.5
    save_file(tensors, file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def nemotron_dir(tmp_path_factory):
    return _with_router_bias(save_tiny(nemotron_config(), str(tmp_path_factory.mktemp("nemh"))))


@pytest.mark.parametrize("engine", [dict(), dict(max_num_batched_tokens=8)],
                         ids=["whole-prompts", "chunked-prefill"])
def test_nemotron_h_matches_hf(nemotron_dir, engine):
    assert_parity(nemotron_dir, prompts((1, 6, 23, 30)), max_new=12, **engine)


def test_nemotron_h_pattern_latent_tied(tmp_path):
    """The released configs' ``hybrid_override_pattern`` string (read by transformers into the
    layer list), MoE latent projections with MLP biases, MQA, a ``head_dim`` other than
    hidden_size / heads (as Nemotron Nano 2's), and ``tie_word_embeddings`` set, which HF's
    Nemotron-H ignores (its checkpoint keeps its own ``lm_head``)."""
    config = nemotron_config(layers_block_type=None, tie_word_embeddings=True, mlp_bias=True,
                             moe_latent_size=24, num_key_value_heads=1, n_group=1, head_dim=24,
                             hybrid_override_pattern="M*EM-")
    path = save_tiny(config, str(tmp_path / "latent"))
    assert_parity(path, prompts((7, 19)), max_new=10, max_num_batched_tokens=8)


def test_nemotron_h_tensor_parallel(nemotron_dir):
    """tensor_parallel_size=2 (gloo): Mamba heads and groups, attention heads, the MLP's and
    every expert's intermediate rows split over the ranks; each mixer sums its own output."""
    assert_parity(nemotron_dir, prompts((5, 21)), max_new=8, tensor_parallel_size=2,
                  device="cpu", max_num_batched_tokens=16)


def test_nemotron_h_preemption(nemotron_dir):
    assert_parity_under_preemption(nemotron_dir)


def test_nemotron_h_refusals(tmp_path):
    assert_refused_at_load(nemotron_config(time_step_limit=(0.05, 0.6)), "NemotronHForCausalLM",
                           tmp_path / "dt", "time_step_limit=.*not supported")
    assert_refused_at_load(nemotron_config(sliding_window=8), "NemotronHForCausalLM",
                           tmp_path / "window", "sliding_window=8 is not supported")


@pytest.mark.slow
@pytest.mark.interpreted
def test_nemotron_h_on_emulated_cuda(nemotron_dir):
    """The cuda backend's pieces (Triton attention, the Triton conv1d, state update and scan,
    the relu2 experts in the grouped MoE GEMMs) under the Triton interpreter, chunked
    prefill."""
    assert_parity(nemotron_dir, prompts((5, 21)), max_new=6, device="cuda", emulate=True,
                  max_num_batched_tokens=8)
