"""Qwen3-Next (``Qwen3NextForCausalLM``) on tiny random models: gated DeltaNet layers (causal
conv, per-request recurrent state, grouped value heads) and gated attention layers (output gate,
q/k norms with 1 + w weights, partial rotary) interleaved, each with sparse experts and a gated
shared expert (or a dense MLP where mlp_only_layers says so). Greedy tokens and per-token
log-probabilities equal HF transformers' in float32 for concurrent requests of different
lengths (prompts longer than the kernels' chunks), under chunked prefill (chunk boundaries
inside prompts: the recurrent states, conv states and KV cache all carry over) and under
preemption (the recomputed request rebuilds its states). Nothing is mocked."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.models.recurrent_state import (assert_preemption_rebuilds_states,
                                          assert_refused_on_ops_without)
from tests.models.variant_parity import TINY, assert_parity, hf_reference, prompts, save_tiny


def qwen3_next_config(**overrides):
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(**{
        **TINY, "num_hidden_layers": 4, "head_dim": 16, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 8,
        "linear_conv_kernel_dim": 4, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
        "layer_types": ["linear_attention", "full_attention", "linear_attention",
                        "linear_attention"], **overrides})


@pytest.fixture(scope="module")
def qwen3_next_dir(tmp_path_factory):
    return save_tiny(qwen3_next_config(), str(tmp_path_factory.mktemp("qwen3next")))


@pytest.mark.parametrize("engine", [dict(), dict(max_num_batched_tokens=8)],
                         ids=["whole-prompts", "chunked-prefill"])
def test_qwen3_next_matches_hf(qwen3_next_dir, engine):
    assert_parity(qwen3_next_dir, prompts((1, 6, 23, 70)), max_new=12, **engine)


def test_qwen3_next_dense_layers_and_one_value_head_per_key(tmp_path):
    """The config switches: a dense MLP on the layers mlp_only_layers names, as many value heads
    as key heads, tied embeddings, q/k/v/o biases (attention_bias), full attention first."""
    config = qwen3_next_config(mlp_only_layers=[0, 2], linear_num_value_heads=2,
                               tie_word_embeddings=True, attention_bias=True,
                               layer_types=["full_attention", "linear_attention",
                                            "linear_attention", "full_attention"])
    path = save_tiny(config, str(tmp_path / "dense"))
    assert_parity(path, prompts((9, 40)), max_new=8, max_num_batched_tokens=16)


def test_qwen3_next_tensor_parallel(qwen3_next_dir):
    """tensor_parallel_size=2 (gloo): each rank holds one of the two DeltaNet key heads and its
    two value heads (their conv channels, states, A_log, dt_bias), half the attention heads and
    half of each expert; the partial sums meet in the norms."""
    assert_parity(qwen3_next_dir, prompts((5, 37)), max_new=8, tensor_parallel_size=2,
                  device="cpu", max_num_batched_tokens=16)


def test_qwen3_next_preemption_recomputes_the_states(qwen3_next_dir):
    """The preempted request's slot is freed and its states (conv and delta rule, in the three
    DeltaNet layers, not the attention one) rebuilt from its first token."""
    assert_preemption_rebuilds_states(qwen3_next_dir, stateful_layers=3)


def test_qwen3_next_async_scheduling_with_preemption(qwen3_next_dir):
    """Async scheduling (the GPU default), a request preempted while its step runs: the state
    slots follow the runner's launches, so the tokens are HF's."""
    assert_preemption_rebuilds_states(qwen3_next_dir, 3, device="cpu", max_num_batched_tokens=16,
                                      async_scheduling=True)


def test_qwen3_next_refuses_what_a_recurrent_state_cannot_do(qwen3_next_dir):
    with pytest.raises(ValueError, match="does not support KV offloading yet"):
        LLM(qwen3_next_dir, dtype="float32", kv_offloading_size=0.01)
    with pytest.raises(ValueError, match="does not support quantization gguf yet"):
        LLM(qwen3_next_dir, dtype="float32", quantization="gguf")
    with pytest.raises(ValueError, match="do not run on backend 'tpu' yet"):
        LLM(qwen3_next_dir, dtype="float32", device="tpu", emulate=True)


def test_qwen3_next_refused_on_ops_without_the_flag(qwen3_next_dir):
    """A plugin's fused ops written before API 9 (no ``supports_gated_delta``): the model is
    refused at load naming the flag, instead of failing inside its first step."""
    assert_refused_on_ops_without(qwen3_next_dir, "supports_gated_delta",
                                  "gated DeltaNet layers.*do not declare supports_gated_delta")


@pytest.mark.parametrize("edit, message", [
    ({"layer_types": ["full_attention", "linear_attention", "linear_attention",
                      "linear_attention"]},
     r"'model.layers.0.linear_attn.\S+' belongs to a linear-attention layer, but "
     r"config.layer_types makes layer 0 full_attention; the config does not match"),
    ({"linear_key_head_dim": 8},
     r"linear_attn.\S+ has shape \(\d+, \d+(, \d+)?\), expected \(\d+, \d+(, \d+)?\) from the "
     r"config's linear_\* sizes; the config does not match the weights"),
], ids=["layer-types", "key-head-dim"])
def test_qwen3_next_config_that_does_not_match_the_weights(qwen3_next_dir, tmp_path, edit,
                                                           message):
    """A config.json whose DeltaNet layers or sizes differ from the checkpoint's is refused at
    load naming the tensor and the config (it failed with AttributeError / a split's
    RuntimeError)."""
    import json
    import shutil

    path = tmp_path / "edited"
    shutil.copytree(qwen3_next_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=message):
        LLM(str(path), dtype="float32", device="cpu")


@pytest.mark.slow
@pytest.mark.interpreted
def test_qwen3_next_on_emulated_cuda(qwen3_next_dir):
    """The cuda backend's pieces (Triton attention, fused MoE, the Triton conv1d, the gated
    delta step and chunk kernels) under the Triton interpreter, with chunked prefill."""
    prompt_list = prompts((5, 37))
    want, _ = hf_reference(qwen3_next_dir, prompt_list, 6)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM(qwen3_next_dir, dtype="float32", device="cuda", emulate=True,
             max_num_batched_tokens=16) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_list], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == want
