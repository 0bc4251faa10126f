"""Multi-LoRA on the families whose HF modules are not Llama's (``lora/families.py``): fused
q/k/v in per-head (GPT-NeoX ``query_key_value``), per-KV-group (Falcon 40B) and ``[q | k | v]``
multi-query (GPT-BigCode ``c_attn``, Falcon 7B) layouts, whose adapter B is cut as the loader
cuts the weight; MLPs without a gate (``fc1/fc2``, ``c_fc/c_proj``, ``dense_h_to_4h/4h_to_h``,
``fc_in/fc_out``); GLM's fused ``gate_up_proj`` beside separate q/k/v; parallel blocks (Phi,
GPT-J, GPT-NeoX, Falcon); OLMoE's and gpt-oss's attention (OLMoE's experts: test_lora_experts.py).
Greedy tokens of a mixed batch (two adapters and rows without one) equal HF transformers + peft
with each adapter applied alone, in float32."""

from __future__ import annotations

import importlib
import random

import pytest

from tessellm.lora import LoRARequest
from tests.lora.adapters import (adapter_models, assert_mixed_batch_matches_peft, base_shapes,
                                 mixed_batch)

MAX_NEW = 5


# family -> (its module in tests/models, the config (or save) function there, arguments)
_MODELS = {
    "gpt-neox": ("test_gpt_neox", "neox_config", {}),  # per-head q/k/v, two-norm parallel block
    "gpt-bigcode": ("test_gpt_bigcode", "bigcode_config", {}),  # multi-query c_attn [q | k | v]
    "falcon-40b": ("test_falcon", "falcon_config",  # per-KV-group q/k/v, two norms
                   dict(new_decoder_architecture=True, num_kv_heads=2, tie_word_embeddings=False)),
    "falcon-7b": ("test_falcon", "falcon_config", {}),  # multi-query, one-norm parallel block
    "phi": ("test_phi", "phi_config", dict(num_key_value_heads=2)),
    "gptj": ("test_gptj", "gptj_config", {}),
    "starcoder2": ("test_starcoder2", "starcoder2_config", {}),
    "glm4": ("test_glm", "glm_config", dict(version="glm4")),
    "olmoe": ("test_olmoe", "olmoe_config", {}),  # MoE attention, q/k normed over all heads
    "gpt-oss": ("test_gpt_oss", "save_gpt_oss", {}),  # MoE; attention with biases and sinks
    # Llama's modules on other layers (parallel block, post norms, multipliers, NoPE, names)
    **{f: (f"test_{f.replace('-', '_')}", f"{f.replace('-', '_')}_config", {}) for f in (
        "cohere", "olmo", "olmo2", "olmo3", "stablelm", "granite", "smollm3", "exaone4",
        "granite-moe")},
    "internlm3": ("test_internlm3", "save_internlm3", {}),
    "exaone": ("test_exaone", "save_exaone", {}),  # transformers 5's names (Llama's)
}


def _save(family: str, path: str) -> str:
    from tests.models.variant_parity import save_tiny

    module, function, kwargs = _MODELS[family]
    make = getattr(importlib.import_module(f"tests.models.{module}"), function)
    if function.startswith("save_"):
        return make(path, **kwargs)
    return save_tiny(make(**kwargs), path)


_LLAMA = {"qkvo8": (8, ["q_proj", "k_proj", "v_proj", "o_proj"], dict(lora_alpha=16)),
          "mlp16": (16, ["gate_proj", "up_proj", "down_proj"], dict(lora_alpha=32))}
# family -> {adapter name: (rank, PEFT target modules, extra LoraConfig arguments)}
SPECS = {
    "gpt-neox": {"qkv8": (8, ["query_key_value", "dense"], dict(lora_alpha=16)),
                 "mlp16": (16, ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"],
                           dict(lora_alpha=8, use_rslora=True))},
    # c_proj: the attention's output and the MLP's second projection, both adapted
    "gpt-bigcode": {"attn8": (8, ["c_attn"], dict(lora_alpha=16)),
                    "all16": (16, ["c_attn", "c_proj", "c_fc"], dict(lora_alpha=32))},
    "falcon-40b": {"qkv8": (8, ["query_key_value"], dict(lora_alpha=16)),
                   "all16": (16, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                             dict(lora_alpha=32))},
    "falcon-7b": {"qkvo8": (8, ["query_key_value", "dense"], dict(lora_alpha=16)),
                  "mlp8": (8, ["dense_h_to_4h", "dense_4h_to_h"], dict(lora_alpha=16))},
    "phi": {"qvd8": (8, ["q_proj", "v_proj", "dense"], dict(lora_alpha=16)),
            "kfc16": (16, ["k_proj", "fc1", "fc2"], dict(lora_alpha=32))},
    "gptj": {"qko8": (8, ["q_proj", "k_proj", "out_proj"], dict(lora_alpha=16)),
             "fc8": (8, ["v_proj", "fc_in", "fc_out"], dict(lora_alpha=16))},
    "starcoder2": {"qv8": (8, ["q_proj", "v_proj"], dict(lora_alpha=16)),
                   "mlp16": (16, ["o_proj", "c_fc", "c_proj"], dict(lora_alpha=32))},
    "glm4": {"kv8": (8, ["k_proj", "v_proj", "o_proj"], dict(lora_alpha=16)),
             "gate16": (16, ["q_proj", "gate_up_proj", "down_proj"], dict(lora_alpha=32))},
    "olmoe": {"qk8": (8, ["q_proj", "k_proj"], dict(lora_alpha=16)),
              "vo16": (16, ["v_proj", "o_proj"], dict(lora_alpha=32))},
    "gpt-oss": {"qv8": (8, ["q_proj", "v_proj"], dict(lora_alpha=16)),
                "ko16": (16, ["k_proj", "o_proj"], dict(lora_alpha=32))},
    **{f: _LLAMA for f in ("cohere", "olmo", "olmo2", "olmo3", "stablelm", "granite", "smollm3",
                           "exaone4", "internlm3", "exaone")},
    "granite-moe": {"qkvo8": _LLAMA["qkvo8"]},
}


@pytest.fixture(scope="module")
def layout_setup(tmp_path_factory):
    return adapter_models(tmp_path_factory, _save, SPECS, seed=3)


def _prompts() -> list[list[int]]:
    rng = random.Random(8)
    return [[rng.randrange(3, 128) for _ in range(n)] for n in (5, 23)]


# one family per distinct layout in the default suite; those whose layout another shares
# (renames only, Llama's, or MoE attention as Mixtral's in test_lora_families.py) slow
_DISTINCT = ("gpt-neox", "gpt-bigcode", "falcon-40b", "phi", "glm4")


@pytest.mark.parametrize("family", [
    f if f in _DISTINCT else pytest.param(f, marks=pytest.mark.slow) for f in SPECS])
def test_layout_mixed_batch_matches_peft(layout_setup, family):
    model, paths = layout_setup(family)
    assert_mixed_batch_matches_peft(model, paths, _prompts(), [None, *SPECS[family]], MAX_NEW,
                                    family)


def test_neox_fused_adapter_is_cut_per_head(layout_setup):
    """B's rows of query_key_value are [q_h | k_h | v_h] per head: q_proj's B is every head's
    first third, not the first third of the rows."""
    from safetensors.torch import load_file

    from tessellm.lora.peft import load_adapter

    model, paths = layout_setup("gpt-neox")
    base = base_shapes(model)
    assert base.layers == ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.fc_in", "mlp.fc_out")
    adapter = load_adapter(LoRARequest("n", 1, paths["qkv8"]), base, 16)
    raw = load_file(f"{paths['qkv8']}/adapter_model.safetensors")
    b = raw["base_model.model.gpt_neox.layers.1.attention.query_key_value.lora_B.weight"]
    per_head = b.unflatten(0, (4, 3, 16))
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        assert adapter.modules[(1, part)].b.equal(per_head[:, i].flatten(0, 1))
    assert adapter.modules[(1, "o_proj")].b.shape == (64, 8)


# transformers 5's EXAONE 3 names (Llama's) -> the original remote code's, in order
_EXAONE_REMOTE = (("model.layers.", "transformer.h."),
                  (".self_attn.o_proj.", ".attn.attention.out_proj."),
                  (".self_attn.", ".attn.attention."), (".mlp.gate_proj.", ".mlp.c_fc_0."),
                  (".mlp.up_proj.", ".mlp.c_fc_1."), (".mlp.down_proj.", ".mlp.c_proj."))


@pytest.mark.parametrize("adapter", ["qkvo8", "mlp16"])
def test_exaone_remote_code_names_load_as_transformers_names(layout_setup, tmp_path, adapter):
    """An EXAONE 3 adapter trained on the original remote code (``transformer.h.N.attn.attention
    .out_proj``, ``mlp.c_fc_0``) is the same adapter as one on transformers 5's Llama names."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tessellm.lora.peft import load_adapter

    model, paths = layout_setup("exaone")
    remote = tmp_path / "remote"
    shutil.copytree(paths[adapter], remote)
    tensors = {}
    for key, tensor in load_file(remote / "adapter_model.safetensors").items():
        for ours, theirs in _EXAONE_REMOTE:
            key = key.replace(ours, theirs)
        tensors[key] = tensor
    assert all(".h." in k and ".layers." not in k for k in tensors)
    save_file(tensors, remote / "adapter_model.safetensors")
    base = base_shapes(model)
    want = load_adapter(LoRARequest("t5", 1, paths[adapter]), base, 16).modules
    got = load_adapter(LoRARequest("remote", 2, str(remote)), base, 16).modules
    assert set(got) == set(want) and len(want) == 2 * (4 if adapter == "qkvo8" else 3)
    for key, m in want.items():
        assert got[key].a.equal(m.a) and got[key].b.equal(m.b) and got[key].scaling == m.scaling


def test_every_layout_lands_in_wrapped_slices():
    """Each logical part of each family's modules is a slice of a layer the family wraps: a
    part without one would be loaded and then silently dropped."""
    from tessellm.lora.families import FAMILIES
    from tessellm.lora.shapes import TARGETS

    for arch, family in FAMILIES.items():
        for path, parts in family.modules.items():
            assert all(part in TARGETS for part in parts), (arch, path, parts)


@pytest.mark.parametrize("family,adapter_family,match", [
    ("phi", "gpt-neox", r"has tensor 'base_model\.model\.gpt_neox\.layers\.0\..*PhiForCausalLM "
                        r"supports q_proj, k_proj, v_proj, dense, fc1, fc2"),
    ("gpt-neox", "falcon-40b", r"GPTNeoXForCausalLM supports query_key_value, dense, "
                               r"dense_h_to_4h, dense_4h_to_h"),
    ("starcoder2", "glm4", r"adapts mlp\.(gate_up|down)_proj .*Starcoder2ForCausalLM has no LoRA "
                           r"support for; it supports q_proj, k_proj, v_proj, o_proj, c_fc, "
                           r"c_proj"),
])
def test_another_family_adapter_is_refused(layout_setup, family, adapter_family, match):
    from tessellm.lora.peft import load_adapter

    model, _ = layout_setup(family)
    path = list(layout_setup(adapter_family)[1].values())[-1]
    with pytest.raises(ValueError, match=match) as err:
        load_adapter(LoRARequest("x", 1, path), base_shapes(model), 64)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("config_class,arch", [("Mamba2Config", "Mamba2ForCausalLM")])
def test_architecture_without_lora_layout_is_refused(config_class, arch):
    import transformers

    from tessellm.lora.shapes import BaseShapes

    config = getattr(transformers, config_class)(architectures=[arch])
    with pytest.raises(ValueError, match=rf"LoRA is not supported for {arch} yet; it is for .*"
                                         r"GPTNeoXForCausalLM.*; serve the model without "
                                         r"--enable-lora"):
        BaseShapes.from_config(config)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt-neox", "falcon-40b", "gpt-bigcode"])
def test_tensor_parallel_layout_lora_matches_tp1(layout_setup, family):
    """TP=2 (gloo worker processes): each rank takes its heads' rows of every q/k/v part of the
    cut B (GPT-BigCode's one KV head: all of k's and v's, on both), fc_in's B rows and fc_out's
    A columns (row-parallel; with biases, GPT-NeoX's, or summed by the next norm, Falcon's);
    tokens equal TP=1's."""
    model, paths = layout_setup(family)
    names = [*SPECS[family], None]
    tokens = {tp: mixed_batch(model, paths, _prompts(), names, MAX_NEW, device="cpu",
                              num_kv_blocks=64, tensor_parallel_size=tp)[1] for tp in (1, 2)}
    assert tokens[2] == tokens[1]


@pytest.mark.parametrize("family,arch,match", [
    ("olmoe", "OlmoeForCausalLM", r"LoRA is not supported on OlmoeForCausalLM's mlp\.gate_up_proj "
                                  r"\(layer 0\): that MLP is a mixture of experts"),
    ("phi", "PhiForCausalLM", r"LoRA is not supported on PhiForCausalLM's mlp\.gate_up_proj "
                              r"\(layer 0\): it is a DenseMLP without a dense gate_up_proj"),
])
def test_layer_without_the_linear_is_refused_naming_it(layout_setup, family, arch, match):
    """The wrap's last line of defence (the table keeps it from happening): the MoE message
    only where the MLP is a mixture of experts."""
    import torch

    from tessellm.backends.registry import BackendRegistry
    from tessellm.config import resolve_model
    from tessellm.loader.model_loader import build_model
    from tessellm.lora.layers import LoRABatch, wrap_model

    registry = BackendRegistry()
    model, _ = build_model(resolve_model(layout_setup(family)[0]), "dummy", registry,
                           registry.backends["cpu"], torch.float32, torch.device("cpu"), 16)
    with pytest.raises(ValueError, match=match):
        wrap_model(model, LoRABatch(None, 1), 1, 8, ("self_attn.o_proj", "mlp.gate_up_proj"),
                   arch)
