"""Gemma 2 (``Gemma2ForCausalLM``) and Gemma (``GemmaForCausalLM``) on tiny random models:
greedy tokens and per-token log-probabilities equal HF transformers' (its eager attention:
SDPA cannot soft-cap) in float32, with chunked prefill, prefix caching (the scoring pass
re-reads each prompt's cached blocks) and prompts longer than a small sliding window, under
tensor parallelism too; and a soft-capped model refused at load on a kernel that cannot cap.

The caps are small (attention 2.0, final 5.0 against scores of a few units) and the window 8,
so each changes HF's own tokens (``test_window_and_caps_change_hf``): a parity case that passes
cannot have dropped any of them.
"""

from __future__ import annotations

import pytest
import torch

from tests.models.variant_parity import (TINY, assert_hf_changed, assert_parity,
                                         assert_refused_at_load, edit_config, hf_reference,
                                         prompts, save_tiny)

GEMMA2 = dict(TINY, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
              attn_logit_softcapping=2.0, final_logit_softcapping=5.0, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)


def gemma2_config(**overrides):
    from transformers import Gemma2Config

    return Gemma2Config(**{**GEMMA2, **overrides})


def gemma_config(**overrides):
    from transformers import GemmaConfig

    return GemmaConfig(**{**TINY, "head_dim": 16, "pad_token_id": 0, "bos_token_id": 1,
                          "eos_token_id": 2, **overrides})


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict(max_num_batched_tokens=8)),
    (dict(num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, attention_bias=True,
          tie_word_embeddings=True, final_logit_softcapping=None, num_hidden_layers=3,
          layer_types=["full_attention", "sliding_attention", "full_attention"]), dict()),
], ids=["window8-caps-chunked", "mqa-bias-tied-no-final-cap-3-layers"])
def test_gemma2_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(gemma2_config(**overrides), str(tmp_path / "gemma2"))
    assert_parity(path, prompts((5, 30)), max_new=16, hf_attn="eager", **engine)


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2),
                                      dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_gemma2_parallel(parallel, tmp_path):
    """TP: heads split over two ranks (gloo), each rank's kernels cap their own heads' scores.
    PP: one layer a stage (a sliding one, then a global one); the last applies the final cap."""
    path = save_tiny(gemma2_config(), str(tmp_path / "par"))
    assert_parity(path, prompts((5, 20)), max_new=8, hf_attn="eager", device="cpu", **parallel)


@pytest.mark.parametrize("field, value", [("attn_logit_softcapping", None),
                                          ("final_logit_softcapping", None),
                                          ("sliding_window", 4096)])
def test_window_and_caps_change_hf(field, value, tmp_path):
    """Each feature the parity cases rely on changes HF's own output on these prompts, so a
    tessellm that dropped it would fail them (checked by hand too: with the cap removed from
    the kernels, ``test_gemma2_matches_hf`` fails)."""
    path = save_tiny(gemma2_config(), str(tmp_path / "g"))
    ps = prompts((5, 30))
    want = hf_reference(path, ps, 16, "eager")
    edit_config(path, **{field: value})
    assert_hf_changed(path, ps, 16, want)


def test_softcap_refused_on_a_kernel_without_it(tmp_path):
    """A plugin kernel of API 3 (no ``supports_logit_softcap``) serving the cpu backend: the
    soft-capped model is refused at load, naming the option and the backend."""
    from tessellm.config import resolve_model
    from tessellm.loader.model_loader import build_model
    from tests.backends.backend_plugins import registry_with_old_cpu_kernel

    registry = registry_with_old_cpu_kernel("supports_logit_softcap")
    path = save_tiny(gemma2_config(), str(tmp_path / "g"))
    with pytest.raises(ValueError, match=r"soft-caps its attention logits \(logit_softcap=2.0.*"
                                         r"backend 'cpu' cannot do .*'old'.*supports_logit_"
                                         r"softcap.*run it on a backend that can: cuda"):
        build_model(resolve_model(path), "safetensors", registry, registry.backends["cpu"],
                    torch.float32, torch.device("cpu"), block_size=16)
    # the same kernel serves a model without the cap
    path = save_tiny(gemma2_config(attn_logit_softcapping=None), str(tmp_path / "nocap"))
    model, _ = build_model(resolve_model(path), "safetensors", registry, registry.backends["cpu"],
                           torch.float32, torch.device("cpu"), block_size=16)
    assert model.layers[0].self_attn.attn.kernel.name == "old"


def test_gemma2_decodes_in_the_cpu_c_kernel(tmp_path):
    """On the cpu backend the soft-capped layers (sliding and global) get the C decode kernel,
    which caps in place (``csrc/paged_decode.c``), so ``test_gemma2_matches_hf`` runs its
    decodes there; before, they fell back to the explicit SDPA path."""
    from tessellm.backends.cpu import native
    from tessellm.backends.registry import BackendRegistry
    from tessellm.config import resolve_model
    from tessellm.loader.model_loader import build_model

    if native.load() is None:
        pytest.skip(f"native kernels unavailable here: {native.unavailable_reason()}")
    registry = BackendRegistry()
    path = save_tiny(gemma2_config(), str(tmp_path / "g"))
    model, _ = build_model(resolve_model(path), "safetensors", registry, registry.backends["cpu"],
                           torch.float32, torch.device("cpu"), block_size=16)
    kernels = [layer.self_attn.attn.kernel for layer in model.layers]
    assert [k.softcap for k in kernels] == [2.0, 2.0] and [k.window for k in kernels] == [8, None]
    assert all(k.native is native.load() for k in kernels)


def test_gemma2_unknown_layer_type_refused(tmp_path):
    config = gemma2_config(layer_types=["sliding_attention", "chunked_attention"])
    assert_refused_at_load(config, "Gemma2ForCausalLM", tmp_path,
                           r"Gemma 2 config.layer_types \['chunked_attention'\] are not supported")


@pytest.mark.parametrize("overrides, engine", [
    (dict(), dict(max_num_batched_tokens=8)),
    (dict(num_key_value_heads=1, head_dim=32, tie_word_embeddings=True, attention_bias=True),
     dict()),
], ids=["chunked", "mqa-head-dim-32-tied-bias"])
def test_gemma_matches_hf(overrides, engine, tmp_path):
    path = save_tiny(gemma_config(**overrides), str(tmp_path / "gemma"))
    assert_parity(path, prompts((5, 30)), max_new=16, **engine)


def test_gemma_tensor_parallel(tmp_path):
    """down_proj leaves its output unsummed; the next layer's norm sums it."""
    path = save_tiny(gemma_config(), str(tmp_path / "tp"))
    assert_parity(path, prompts((5, 20)), max_new=8, tensor_parallel_size=2, device="cpu")


def test_gemma_legacy_gelu_is_tanh(tmp_path):
    """Released Gemma configs say hidden_act "gelu"; HF (and we) run the tanh GELU."""
    path = save_tiny(gemma_config(), str(tmp_path / "gelu"))
    edit_config(path, hidden_act="gelu")
    assert_parity(path, prompts((12,)), max_new=8)


def test_gemma_other_activation_refused(tmp_path):
    assert_refused_at_load(gemma_config(hidden_act="silu"), "GemmaForCausalLM", tmp_path,
                           "Gemma hidden_act 'silu' is not supported")


# rocm runs the cuda backend's Triton kernels with other tiles; the default suite keeps cuda's
# run of that kernel (the interpreter's cost), rocm's runs in the slow lane (ci/matrix.yaml's
# cpu lane) beside its kernel conformance (rocm-interpret).
@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=pytest.mark.interpreted),
    pytest.param("rocm", marks=[pytest.mark.slow, pytest.mark.interpreted]), "xpu", "tpu"])
def test_gemma2_on_emulated_backends(device, tmp_path):
    """Each in-tree backend's own soft-capping attention in the whole model, its device
    emulated on host tensors (Triton kernels in the interpreter for cuda and rocm, the padded
    torch kernel for xpu and tpu): HF's tokens and log-probabilities, chunked, past the window."""
    path = save_tiny(gemma2_config(), str(tmp_path / "g"))
    # five new tokens: both prompts' decode queries reach past the window of 8 (the last at
    # position 5 + 5 - 2 = 8); each interpreted decode step (cuda) costs seconds
    assert_parity(path, prompts((5, 20)), max_new=5, hf_attn="eager", device=device,
                  emulate=True, max_num_batched_tokens=8)
