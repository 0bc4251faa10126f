"""Falcon-H1 (``FalconH1ForCausalLM``) on tiny random models: attention and a Mamba2 mixer side
by side in every layer, every muP multiplier away from 1 (folded into the weights at load),
``mamba_d_ssm`` narrower than ``mamba_expand * hidden_size``, and each of the mixer's three
gated-norm settings. Greedy tokens and per-token log-probabilities equal HF transformers' in
float32 for concurrent requests of different lengths, under chunked prefill and preemption.
Nothing is mocked."""

from __future__ import annotations

import pytest

from tests.models.preemption_parity import assert_parity_under_preemption
from tests.models.variant_parity import (TINY, assert_hf_changed, assert_parity, edit_config,
                                         hf_reference, prompts, save_tiny)

MULTIPLIERS = dict(embedding_multiplier=1.7, lm_head_multiplier=0.6, key_multiplier=1.4,
                   attention_in_multiplier=0.8, attention_out_multiplier=1.3,
                   ssm_in_multiplier=1.2, ssm_out_multiplier=0.7, mlp_multipliers=[1.5, 0.6],
                   ssm_multipliers=[0.9, 1.3, 0.7, 1.6, 1.2])


def falcon_h1_config(**overrides):
    from transformers import FalconH1Config

    return FalconH1Config(**{
        **TINY, "num_hidden_layers": 3, "mamba_d_ssm": 96, "mamba_n_heads": 6,
        "mamba_d_head": 16, "mamba_n_groups": 2, "mamba_d_state": 16, "mamba_d_conv": 4,
        "mamba_chunk_size": 8, "mamba_rms_norm": True, "mamba_norm_before_gate": False,
        **MULTIPLIERS, **overrides})


@pytest.fixture(scope="module")
def falcon_dir(tmp_path_factory):
    return save_tiny(falcon_h1_config(), str(tmp_path_factory.mktemp("falconh1")))


@pytest.mark.parametrize("engine", [dict(), dict(max_num_batched_tokens=8)],
                         ids=["whole-prompts", "chunked-prefill"])
def test_falcon_h1_matches_hf(falcon_dir, engine):
    assert_parity(falcon_dir, prompts((1, 6, 23, 30)), max_new=12, **engine)


@pytest.mark.parametrize("norm", [dict(mamba_rms_norm=False),
                                  dict(mamba_rms_norm=True, mamba_norm_before_gate=True)],
                         ids=["no-norm", "norm-before-gate"])
def test_falcon_h1_gated_norms_and_biases(norm, tmp_path):
    """The mixer's other two norm settings (no norm: Falcon-H1's released one), with every
    bias on (q/k/v/o, the MLP, the mixer's in/out projections), tied embeddings, MQA, and a
    ``head_dim`` other than hidden_size / heads (as Falcon-H1-0.5B's)."""
    config = falcon_h1_config(attention_bias=True, mlp_bias=True, projectors_bias=True,
                              mamba_proj_bias=True, tie_word_embeddings=True,
                              num_key_value_heads=1, head_dim=8, **norm)
    path = save_tiny(config, str(tmp_path / "variant"))
    assert_parity(path, prompts((7, 19)), max_new=10, max_num_batched_tokens=8)


def test_falcon_h1_multipliers_matter(falcon_dir, tmp_path):
    """Each group of multipliers changes HF's output, so the parity cases check their folds."""
    import shutil

    prompt_list = prompts((9,))
    want = hf_reference(falcon_dir, prompt_list, 6, "eager")
    for name, value in [("key_multiplier", 1.0), ("ssm_multipliers", [1.0] * 5),
                        ("mlp_multipliers", [1.0, 1.0]), ("attention_in_multiplier", 1.0)]:
        path = str(tmp_path / name)
        shutil.copytree(falcon_dir, path)
        edit_config(path, **{name: value})
        assert_hf_changed(path, prompt_list, 6, want)


def test_falcon_h1_tensor_parallel(falcon_dir):
    """tensor_parallel_size=2 (gloo): attention heads, Mamba heads and groups, MLP rows split;
    the attention's and the mixer's partial sums are summed once, by pre_ff_layernorm."""
    assert_parity(falcon_dir, prompts((5, 21)), max_new=8, tensor_parallel_size=2, device="cpu",
                  max_num_batched_tokens=16)


def test_falcon_h1_tensor_parallel_with_biases(tmp_path):
    """An attention bias without a mixer bias: o_proj must sum its output itself (the bias is
    added once, after the sum), so the mixer's out_proj sums too and pre_ff_layernorm does not;
    the MLP's bias likewise moves the sum into down_proj. One group of B/C, replicated."""
    config = falcon_h1_config(attention_bias=True, mlp_bias=True, mamba_n_groups=1)
    path = save_tiny(config, str(tmp_path / "biases"))
    assert_parity(path, prompts((5, 21)), max_new=8, tensor_parallel_size=2, device="cpu",
                  max_num_batched_tokens=16)


@pytest.mark.slow  # the default suite: with_biases (after the gate) and test_gated_norm.py's
# tensor-parallel case (every mode on two ranks) cover the code
def test_falcon_h1_tensor_parallel_norm_before_gate_over_ranks(tmp_path):
    """One group of B/C (``mamba_n_groups=1``) at tensor_parallel_size=2 (gloo): the gated
    norm's one group spans both ranks' slices of the SSM output, so its mean of squares is
    summed over them (``mamba_mixer.tp_gated_rms_norm``), here normed before the gate
    (``mamba_norm_before_gate``: norm(y) * silu(z); after the gate, the default, runs in
    ``test_falcon_h1_tensor_parallel_with_biases``). Greedy tokens as HF's in float32."""
    config = falcon_h1_config(mamba_n_groups=1, mamba_norm_before_gate=True)
    path = save_tiny(config, str(tmp_path / "one-group"))
    assert_parity(path, prompts((5, 21)), max_new=8, tensor_parallel_size=2, device="cpu",
                  max_num_batched_tokens=16)


def test_falcon_h1_preemption(falcon_dir):
    assert_parity_under_preemption(falcon_dir)


@pytest.mark.slow
@pytest.mark.interpreted
def test_falcon_h1_on_emulated_cuda(falcon_dir):
    """The cuda backend's pieces (Triton attention, the Triton conv1d, state update and scan)
    side by side in each layer under the Triton interpreter, with chunked prefill."""
    assert_parity(falcon_dir, prompts((5, 21)), max_new=6, device="cuda", emulate=True,
                  max_num_batched_tokens=8)
