"""Apertus (``ApertusForCausalLM``) on tiny random models: the ungated MLP with the learned
xIELU activation, per-head q/k RMSNorm and llama3 rope; greedy tokens and per-token
log-probabilities equal HF transformers' in float32, under chunked prefill too."""

from __future__ import annotations

import pytest
import torch

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny


def apertus_config(**overrides):
    from transformers import ApertusConfig

    return ApertusConfig(**{**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                            "dtype": torch.float32, **overrides})


def save_apertus(config, path: str) -> str:
    """save_tiny's model with each layer's xIELU parameters moved off HF's initial values (the
    same in every layer), so a layer loading another's would show."""
    from safetensors.torch import load_file, save_file

    save_tiny(config, path)
    tensors = load_file(f"{path}/model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for name in tensors:
        if name.endswith(("act_fn.alpha_p", "act_fn.alpha_n")):
            tensors[name] = tensors[name] + torch.rand(1, generator=gen) - 0.5
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict(max_num_batched_tokens=8)),  # llama3 rope (Apertus's default)
    (dict(attention_bias=True, num_key_value_heads=1, tie_word_embeddings=True,
          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), dict()),
], ids=["llama3-rope-chunked", "bias-mqa-tied-default-rope"])
def test_apertus_matches_hf(overrides, engine, tmp_path):
    path = save_apertus(apertus_config(**overrides), str(tmp_path / "apertus"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


# Slow lane (ci/matrix.yaml's cpu lane): xIELU runs on each rank's columns of up_proj, its
# parameters replicated; down_proj's partial sums are summed by the next norm.
@pytest.mark.slow
def test_apertus_tensor_parallel(tmp_path):
    path = save_apertus(apertus_config(), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")
