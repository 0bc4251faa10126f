"""Multi-LoRA on session 15's text families: Seed-OSS, ERNIE 4.5, Hunyuan dense, Cohere 2 and
Ministral 3 (llama's modules), Apertus (llama's attention, the ungated ``up_proj`` /
``down_proj`` MLP onto our ``fc_in`` / ``fc_out``), and the attention of GLM-4.5, ERNIE 4.5 MoE,
Hunyuan MoE and dots.llm1 (experts and their dense layers without LoRA, as the other MoE
families). Greedy tokens of a mixed batch (some requests without adapter) equal HF
transformers + peft with each adapter applied alone, in float32."""

from __future__ import annotations

import pytest

from tests.lora.adapters import (adapter_models, assert_mixed_batch_matches_peft, base_shapes,
                                 make_adapters, mixed_batch, peft_greedy)
from tests.models.variant_parity import prompts

MAX_NEW = 6
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# family -> {adapter name: (rank, PEFT target modules, extra LoraConfig arguments)}
SPECS = {
    "seed-oss": {"all8": (8, ALL, dict(lora_alpha=16)),
                 "qvo16": (16, ["q_proj", "v_proj", "o_proj"], dict(lora_alpha=8,
                                                                     use_rslora=True))},
    "ernie4_5": {"all8": (8, ALL, dict(lora_alpha=16))},
    "hunyuan": {"all8": (8, ALL, dict(lora_alpha=16))},
    "apertus": {"updown8": (8, ["q_proj", "k_proj", "up_proj", "down_proj"], dict(lora_alpha=16)),
                "all16": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                          dict(lora_alpha=32))},
    "cohere2": {"all8": (8, ALL, dict(lora_alpha=16))},
    "ministral3": {"all8": (8, ALL, dict(lora_alpha=16))},
    "glm4-moe": {"attn8": (8, ATTN, dict(lora_alpha=16))},
    "ernie4_5-moe": {"qv8": (8, ["q_proj", "v_proj"], dict(lora_alpha=16))},
    "hunyuan-moe": {"attn8": (8, ATTN, dict(lora_alpha=16))},
    "dots1": {"ko8": (8, ["k_proj", "o_proj", "q_proj"], dict(lora_alpha=16))},
}


def _config(family: str):
    if family == "seed-oss":  # q/k/v biases, head_dim 32 apart from hidden / heads
        from tests.models.test_seed_oss_hunyuan import seed_oss_config

        return seed_oss_config()
    if family == "ernie4_5":  # interleaved rotary, biases everywhere
        from tests.models.test_ernie4_5 import ernie4_5_config

        return ernie4_5_config(use_bias=True)
    if family == "hunyuan":  # q/k norms after rotary, of the adapted projections
        from tests.models.test_seed_oss_hunyuan import hunyuan_config

        return hunyuan_config(attention_bias=True)
    if family == "apertus":
        from tests.models.test_apertus import apertus_config

        return apertus_config()
    if family == "cohere2":  # parallel block, sliding and global layers
        from tests.models.test_cohere2 import cohere2_config

        return cohere2_config()
    if family == "ministral3":  # YaRN and the attention temperature on the adapted q
        from transformers import Ministral3Config

        from tests.models.variant_parity import TINY

        return Ministral3Config(**{**TINY, "head_dim": 16, "sliding_window": None,
                                   "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                   "rope_parameters": {
                                       "rope_type": "yarn", "rope_theta": 10000.0,
                                       "factor": 16.0, "original_max_position_embeddings": 8,
                                       "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                                       "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}})
    if family == "glm4-moe":  # layer 0 dense, 1-2 MoE; q/k norms, half rotary
        from tests.models.test_glm4_moe import glm4_moe_config

        return glm4_moe_config(use_qk_norm=True, attention_bias=True)
    if family == "ernie4_5-moe":
        from tests.models.test_ernie4_5 import ernie4_5_moe_config

        return ernie4_5_moe_config(use_bias=True)
    if family == "hunyuan-moe":
        from tests.models.test_seed_oss_hunyuan import hunyuan_moe_config

        return hunyuan_moe_config()
    from tests.models.test_dots1 import dots1_config

    return dots1_config(attention_bias=True)


def _save(family: str, path: str) -> str:
    config = _config(family)
    if family == "apertus":  # each layer's xIELU moved off HF's initial values
        from tests.models.test_apertus import save_apertus

        return save_apertus(config, path)
    from tests.models.test_deepseek import save_deepseek  # norms and biases random too

    return save_deepseek(config, path)


@pytest.fixture(scope="module")
def new_family_setup(tmp_path_factory):
    return adapter_models(tmp_path_factory, _save, SPECS, seed=11)


@pytest.mark.parametrize("family", list(SPECS))
def test_new_family_mixed_batch_matches_peft(new_family_setup, family):
    model, paths = new_family_setup(family)
    assert_mixed_batch_matches_peft(model, paths, prompts((5, 29)), [None, *SPECS[family]],
                                    MAX_NEW, family)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["apertus", "hunyuan-moe"])
def test_tensor_parallel_new_family_lora_matches_peft(new_family_setup, family):
    """TP=2 (gloo worker processes): Apertus's ungated MLP (fc_in B rows and fc_out A columns
    of each rank), Hunyuan MoE's attention with q/k norms after rotary; the tokens equal TP=1's
    and peft's."""
    model, paths = new_family_setup(family)
    names = [*SPECS[family], None]
    tokens = {tp: mixed_batch(model, paths, prompts((5, 29)), names, MAX_NEW, device="cpu",
                              num_kv_blocks=64, tensor_parallel_size=tp) for tp in (1, 2)}
    assert tokens[2][1] == tokens[1][1]
    jobs, got = tokens[2]
    want = peft_greedy(model, paths[names[0]], prompts((5, 29)), MAX_NEW)
    assert [t for t, (_, n) in zip(got, jobs) if n == names[0]] == want


def test_glm4_moe_mlp_adapter_is_refused(new_family_setup, tmp_path):
    """GLM-4.5's dense layer 0 has llama's MLP, but its MLP adapters (PEFT puts down_proj on
    layer 0's MLP, the shared and the routed experts) are refused as the other MoE families':
    one error naming the module and what is supported."""
    from tessellm.lora import LoRARequest
    from tessellm.lora.peft import load_adapter

    model, _ = new_family_setup("glm4-moe")
    path = make_adapters(model, str(tmp_path), specs={"mlp": (4, ["down_proj"], {})})["mlp"]
    with pytest.raises(ValueError, match=r"adapts mlp\.\S+ \(layer \d\), .*Glm4MoeForCausalLM.*"
                                         r"supports q_proj, k_proj, v_proj, o_proj \(attention "
                                         r"only") as err:
        load_adapter(LoRARequest("x", 1, path), base_shapes(model), 64)
    assert "\n" not in str(err.value)


def test_ministral3_images_off_lora_adapter_of_the_image_text_model(tmp_path):
    """Ministral 3 ships as Mistral3ForConditionalGeneration with a ``ministral3`` language
    model: served text-only (images off), an adapter trained on the image-text model (every
    projection of the language model and the tower) gives HF PEFT's tokens, next to the base
    model in one batch. Before, images off refused the checkpoint ('with a 'ministral3'
    language model is not supported')."""
    from tests.multimodal.test_text_only import (_image_text_adapter,
                                                 assert_text_lora_matches_peft)
    from tests.multimodal.tiny_mistral3 import make_tiny_mistral3

    model = make_tiny_mistral3(str(tmp_path / "model"), seed=3, text_type="ministral3")
    adapter = _image_text_adapter(model, str(tmp_path / "lora"), ALL)
    prompts = [[1, 40, 41, 42, 43], [1, 50, 60, 70, 80, 90, 100, 110, 120, 130]]
    assert_text_lora_matches_peft(model, adapter, prompts)
