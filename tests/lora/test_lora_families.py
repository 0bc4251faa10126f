"""Multi-LoRA beyond the Llama family: Qwen2 (q/k/v biases), Qwen3 (head_dim apart from the
hidden size, q/k norms), Gemma, Gemma 2 and 3, Phi-3 (fused ``qkv_proj`` / ``gate_up_proj``
adapters split onto our fused layers' slices) and the attention of the MoE families. Greedy
tokens of a mixed batch (some requests without adapter) equal HF transformers + peft with each
adapter applied alone, in float32; an adapter for a module the family's LoRA does not cover is
refused naming it and what is supported."""

from __future__ import annotations

import random

import pytest
import torch

from tessellm.lora import LoRARequest
from tests.lora.adapters import (adapter_models, assert_mixed_batch_matches_peft, base_shapes,
                                 make_adapters, mixed_batch, peft_greedy)

MAX_NEW = 6
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# family -> {adapter name: (rank, PEFT target modules, extra LoraConfig arguments)}
SPECS = {
    "gemma3": {"qvdown8": (8, ["q_proj", "v_proj", "down_proj"], dict(lora_alpha=16)),
               "all16": (16, ALL, dict(lora_alpha=8, use_rslora=True))},
    # Gemma 2: window 8 and both soft-caps (the adapted q/k/v feed the capped attention)
    "gemma2": {"qko8": (8, ["q_proj", "k_proj", "o_proj", "up_proj"], dict(lora_alpha=16))},
    "gemma": {"all8": (8, ALL, dict(lora_alpha=16))},
    "phi3": {"qkvo8": (8, ["qkv_proj", "o_proj"], dict(lora_alpha=16)),
             "fused16": (16, ["qkv_proj", "gate_up_proj", "down_proj"], dict(lora_alpha=32))},
    "mixtral": {"qv8": (8, ["q_proj", "v_proj"], dict(lora_alpha=16)),
                "kqo16": (16, ["k_proj", "q_proj", "o_proj"], dict(lora_alpha=8))},
    "qwen2-moe": {"qkvo16": (16, ["q_proj", "k_proj", "v_proj", "o_proj"], dict(lora_alpha=32))},
    "qwen3-moe": {"vo8": (8, ["v_proj", "o_proj"], dict(lora_alpha=16, use_rslora=True))},
    # Qwen2: q/k/v biases (the adapter adds after them); Qwen3: head_dim 32 != hidden / heads,
    # q/k norms after the adapted projections
    "qwen2": {"qkv16": (16, ["q_proj", "k_proj", "v_proj", "down_proj"], dict(lora_alpha=32))},
    "qwen3": {"all8": (8, ALL, dict(lora_alpha=16))},
}


def _save(family: str, path: str) -> str:
    from transformers import AutoModelForCausalLM, Phi3Config

    if family in ("mixtral", "qwen2-moe", "qwen3-moe"):
        from tests.models.tiny_moe import save_tiny_moe

        return save_tiny_moe(family, path)
    if family in ("qwen2", "qwen3"):
        from tests.conftest import _tiny_configs

        config = _tiny_configs()[family]
        config.initializer_range = 0.25  # sharp logits: no greedy ties
    elif family == "gemma3":
        from tests.models.test_gemma3_parity import gemma3_config

        config = gemma3_config(num_hidden_layers=2,
                               layer_types=["sliding_attention", "full_attention"])
    elif family in ("gemma2", "gemma"):
        from tests.models.test_gemma2 import gemma2_config, gemma_config

        make = gemma2_config if family == "gemma2" else gemma_config
        config = make(vocab_size=256, max_position_embeddings=512)
    else:
        config = Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                            bos_token_id=2, tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # Gemma's (1 + w) norms start at w = 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name and family.startswith("gemma"):
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def family_setup(tmp_path_factory):
    return adapter_models(tmp_path_factory, _save, SPECS, seed=5)


def _prompts() -> list[list[int]]:
    rng = random.Random(8)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in (5, 29)]


@pytest.mark.parametrize("family", list(SPECS))
def test_family_mixed_batch_matches_peft(family_setup, family):
    model, paths = family_setup(family)
    assert_mixed_batch_matches_peft(model, paths, _prompts(), [None, *SPECS[family]], MAX_NEW,
                                    family)


def test_fused_phi3_adapter_splits_onto_slices(family_setup):
    from tessellm.lora.peft import load_adapter

    model, paths = family_setup("phi3")
    base = base_shapes(model)
    assert base.layers == ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                           "mlp.down_proj")
    adapter = load_adapter(LoRARequest("f", 1, paths["fused16"]), base, 16)
    q, k, v = (adapter.modules[(0, m)] for m in ("q_proj", "k_proj", "v_proj"))
    assert q.a is k.a is v.a and (q.b.shape[0], k.b.shape[0], v.b.shape[0]) == (64, 32, 32)
    assert adapter.modules[(1, "gate_proj")].b.shape == adapter.modules[(1, "up_proj")].b.shape


@pytest.mark.parametrize("family,adapter_family,match", [
    ("phi3", "gemma3", r"adapts self_attn\.q_proj .*Phi3ForCausalLM.*supports qkv_proj, o_proj, "
                       r"gate_up_proj, down_proj"),
    ("qwen3-moe", "phi3", r"adapts self_attn\.qkv_proj .*supports q_proj, k_proj, v_proj, o_proj"),
    ("qwen2-moe", "qwen2-moe-gate", r"adapts mlp\.shared_expert_gate .*Qwen2MoeForCausalLM"
                                    r".*up_proj, down_proj \(gate/up/down: the shared expert's"),
])
def test_module_the_family_lacks_is_refused(family_setup, tmp_path, family, adapter_family, match):
    from tessellm.lora.peft import load_adapter

    model, _ = family_setup(family)
    if adapter_family == "qwen2-moe-gate":  # the shared expert's sigmoid gate: no LoRA
        path = make_adapters(model, str(tmp_path), specs={"g": (4, ["shared_expert_gate"], {})})["g"]
    else:
        path = next(iter(family_setup(adapter_family)[1].values()))
    with pytest.raises(ValueError, match=match) as err:
        load_adapter(LoRARequest("x", 1, path), base_shapes(model), 64)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["phi3", "qwen3-moe"])
def test_tensor_parallel_family_lora_matches_tp1(family_setup, family):
    """TP=2 (gloo worker processes): fused Phi-3 adapters split into parts, each part's B rows
    narrowed like the base weight's; row-parallel o/down A columns; the tokens equal TP=1's."""
    model, paths = family_setup(family)
    names = [*SPECS[family], None]
    prompts = _prompts()
    tokens = {tp: mixed_batch(model, paths, prompts, names, MAX_NEW, device="cpu",
                              num_kv_blocks=64, tensor_parallel_size=tp) for tp in (1, 2)}
    assert tokens[2][1] == tokens[1][1]
    name = names[0]  # and TP=1 is peft's (the fast test checks every adapter)
    want = peft_greedy(model, paths[name], prompts, MAX_NEW)
    jobs, got = tokens[1]
    assert [t for t, (_, n) in zip(got, jobs) if n == name] == want
