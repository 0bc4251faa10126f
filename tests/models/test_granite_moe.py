"""Granite MoE (``GraniteMoeForCausalLM``, and ``GraniteMoeSharedForCausalLM`` with its shared
MLP) on tiny random models (4 experts, top 2): the
stacked expert tensors of its checkpoint and Granite's four scalars; greedy tokens and per-token
log-probabilities equal HF transformers' in float32, under chunked prefill and at
tensor_parallel_size=2 (gloo: each rank holds a slice of every expert)."""

from __future__ import annotations

import pytest

from tests.models.test_granite import SCALARS
from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny


def granite_moe_config(**overrides):
    from transformers import GraniteMoeConfig

    return GraniteMoeConfig(**{**TINY, **SCALARS, "intermediate_size": 32,
                               "num_local_experts": 4, "num_experts_per_tok": 2, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict()),
    (dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
          num_experts_per_tok=1), dict(max_num_batched_tokens=8)),
], ids=["plain", "mqa-tied-bias-top1-chunked"])
def test_granite_moe_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(granite_moe_config(**overrides), str(tmp_path / "granitemoe"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


def test_granite_moe_tensor_parallel(tmp_path):
    path = save_tiny(granite_moe_config(), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


def granite_moe_shared_config(**overrides):
    from transformers import GraniteMoeSharedConfig

    return GraniteMoeSharedConfig(**{**TINY, **SCALARS, "intermediate_size": 32,
                                     "shared_intermediate_size": 48, "num_local_experts": 4,
                                     "num_experts_per_tok": 2, **overrides})


@pytest.mark.parametrize("tp", [1, 2])
def test_granite_moe_shared_matches_hf(tp, tmp_path):
    """GraniteMoeShared: the ungated shared MLP beside the experts (fused checkpoint tensors)."""
    path = save_tiny(granite_moe_shared_config(), str(tmp_path / "shared"))
    engine = dict(tensor_parallel_size=2, device="cpu") if tp == 2 else {}
    assert_parity(path, prompts((5, 30)), max_new=8 if tp == 2 else 16, **engine)


def test_granite_moe_shared_quantized_fp8(tmp_path):
    """quantization="fp8" quantizes the shared MLP beside the experts: its fused checkpoint
    tensors reach the quantized loader cut into gate / up / down (before, they failed to load,
    named as having no place), and each quantized layer dequantizes to its checkpoint rows
    within e4m3's rounding (gate above up, as the checkpoint stacks them)."""
    import torch
    from safetensors.torch import load_file

    from tessellm.backends.registry import BackendRegistry
    from tessellm.config import resolve_model
    from tessellm.loader.model_loader import build_model
    from tessellm.quantization.loading import quantized_linears

    config = granite_moe_shared_config()
    path = save_tiny(config, str(tmp_path / "shared"))
    registry = BackendRegistry()
    model, _ = build_model(resolve_model(path), "safetensors", registry, registry.backends["cpu"],
                           torch.float32, torch.device("cpu"), 16, quantization="fp8")
    state = load_file(f"{path}/model.safetensors")
    layers = quantized_linears(model)
    for i in range(config.num_hidden_layers):
        fused = state[f"model.layers.{i}.shared_mlp.input_linear.weight"]  # [gate; up]
        for ours, want in ((f"layers.{i}.mlp.shared_mlp.gate_up_proj", fused),
                           (f"layers.{i}.mlp.shared_mlp.down_proj",
                            state[f"model.layers.{i}.shared_mlp.output_linear.weight"])):
            got = torch.cat([s.dequantize(torch.float32) for s in layers[ours].segments])
            err = (got - want).abs().amax(dim=1) / want.abs().amax(dim=1)
            assert got.shape == want.shape and float(err.max()) < 0.07, (ours, float(err.max()))
