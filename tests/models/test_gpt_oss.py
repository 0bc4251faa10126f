"""gpt-oss (``GptOssForCausalLM``) on tiny random models: greedy tokens and per-token
log-probabilities equal HF transformers' (eager attention: the one HF path with sinks on the
CPU) in float32, with sliding windows smaller than the prompts, chunked prefill, prefix caching
(the scoring pass re-reads each prompt's cached blocks), a batch of different lengths, and
tensor parallelism over two CPU ranks; a model with sinks refused at load on a kernel without
them; and the features the parity cases rely on change HF's own output (so a tessellm that
dropped one would fail them).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.models.variant_parity import (assert_hf_changed, assert_parity, edit_config,
                                         hf_reference, prompts, save_tiny)

GPT_OSS = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
               max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2,
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False,
                                "original_max_position_embeddings": 64, "rope_theta": 150000.0},
               pad_token_id=0, bos_token_id=1, eos_token_id=2)


def gpt_oss_config(**overrides):
    from transformers import GptOssConfig

    return GptOssConfig(**{**GPT_OSS, **overrides})


def save_gpt_oss(path: str, **overrides) -> str:
    """A tiny gpt-oss; sinks from N(0, 2) (HF initialises them at std 0.2: too small to
    matter) and the expert biases set by ``save_tiny``'s ``.bias`` rule are not named so:
    they get uniform(-0.5, 0.5) here."""
    save_tiny(gpt_oss_config(**overrides), path)
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(5)
    for name, t in tensors.items():
        if name.endswith(".sinks"):
            tensors[name] = torch.randn(t.shape, generator=gen) * 2.0
        elif name.endswith(("_proj_bias", "router.bias")):
            tensors[name] = torch.rand(t.shape, generator=gen) - 0.5
        elif name.endswith("experts.gate_up_proj"):  # gates past the clamp (+-7) sometimes
            tensors[name] = t * 8.0
    save_file(tensors, file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def tiny_gpt_oss(tmp_path_factory):
    return save_gpt_oss(str(tmp_path_factory.mktemp("gpt_oss") / "m"))


def test_gpt_oss_matches_hf(tiny_gpt_oss):
    """Prompts 5..30 against a window of 6 (sliding layer 0, full layer 1), a batch of four
    lengths, chunked prefill in 8-token steps, prefix caching on."""
    assert_parity(tiny_gpt_oss, prompts((5, 30, 11, 17)), max_new=12, hf_attn="eager",
                  max_num_batched_tokens=8, enable_prefix_caching=True)


def test_gpt_oss_tensor_parallel(tiny_gpt_oss):
    """Two CPU ranks (gloo): each holds two query heads and their sinks, one KV head, every
    expert's half of I; the down bias joins once."""
    assert_parity(tiny_gpt_oss, prompts((5, 20)), max_new=8, hf_attn="eager", device="cpu",
                  tensor_parallel_size=2)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=[pytest.mark.slow, pytest.mark.interpreted]), "tpu"])
def test_gpt_oss_on_emulated_backends(device, tiny_gpt_oss):
    """The backends' own sink kernels in the whole model, the device emulated on host tensors:
    cuda's Triton attention (prefill, split decode with the reduce kernel) and fused MoE with
    the clamped SwiGLU in the interpreter (slow lane: 20-50 s here; the kernels' own tests are in
    the default suite), tpu's padded torch kernel (rocm and xpu share these); chunked, past the
    window."""
    assert_parity(tiny_gpt_oss, prompts((13,)), max_new=4, hf_attn="eager", device=device,
                  emulate=True, max_num_batched_tokens=8)


def test_config_without_swiglu_alpha_loads(tiny_gpt_oss, monkeypatch):
    """Released configs carry no ``swiglu_alpha`` and transformers before 5.2x has no such
    field, so the model takes gpt-oss's fixed 1.702: the same tokens as with the field. (On a
    GPU host with transformers 5.17 loading raised AttributeError.) The field is taken off the
    config class and the loaded config as the older transformers has it."""
    import transformers
    from transformers import GptOssConfig

    from tessellm import LLM, SamplingParams

    def greedy():
        with LLM(tiny_gpt_oss, device="cpu", dtype="float32") as llm:
            out = llm.generate([{"prompt_token_ids": prompts((9,))[0]}],
                               SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                               use_tqdm=False)
        return out[0].outputs[0].token_ids

    want = greedy()
    load = transformers.AutoConfig.from_pretrained

    def old_transformers(*a, **k):
        config = load(*a, **k)
        config.__dict__.pop("swiglu_alpha", None)
        return config

    monkeypatch.delattr(GptOssConfig, "swiglu_alpha")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", old_transformers)
    assert not hasattr(transformers.AutoConfig.from_pretrained(tiny_gpt_oss), "swiglu_alpha")
    assert greedy() == want


def _edit(path: str, change) -> None:
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def hf_base(tiny_gpt_oss):
    ps = prompts((30,))
    return ps, hf_reference(tiny_gpt_oss, ps, 4, "eager")


@pytest.mark.parametrize("feature", ["sinks", "window", "clamp"])
def test_features_change_hf(feature, tiny_gpt_oss, hf_base, tmp_path):
    """Each feature changes HF's own output on the parity model's longest prompt: the sinks
    (set to -1e9: none), the window (made larger than the prompt), the SwiGLU clamp (raised out
    of reach)."""
    import shutil

    path = shutil.copytree(tiny_gpt_oss, str(tmp_path / "g"))
    ps, want = hf_base
    if feature == "sinks":
        _edit(path, lambda t: t.update({n: torch.full_like(v, -1e9) for n, v in t.items()
                                        if n.endswith(".sinks")}))
    else:
        edit_config(path, **{"window": {"sliding_window": 4096},
                             "clamp": {"swiglu_limit": 1e6}}[feature])
    assert_hf_changed(path, ps, 4, want)


def test_sinks_refused_on_a_kernel_without_them(tiny_gpt_oss):
    """A plugin kernel of API 4 (no ``supports_attention_sinks``) serving the cpu backend: the
    model is refused at load, naming the option and the backend."""
    from tessellm.config import resolve_model
    from tessellm.loader.model_loader import build_model
    from tests.backends.backend_plugins import registry_with_old_cpu_kernel

    registry = registry_with_old_cpu_kernel("supports_attention_sinks")
    with pytest.raises(ValueError, match=r"has attention sinks .*backend 'cpu' cannot do .*"
                                         r"'old'.*supports_attention_sinks.*run it on a backend "
                                         r"that can: cuda"):
        build_model(resolve_model(tiny_gpt_oss), "safetensors", registry,
                    registry.backends["cpu"], torch.float32, torch.device("cpu"), block_size=16)
