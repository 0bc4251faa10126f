"""Reading PEFT adapters: scaling as PEFT computes it, and one clear refusal per bad input."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from tessellm.lora.peft import load_adapter
from tessellm.lora.request import LoRARequest
from tessellm.lora.shapes import BaseShapes


@pytest.fixture(scope="module")
def base(lora_setup):
    return BaseShapes.from_config(AutoConfig.from_pretrained(lora_setup[0]))


def _load(path, base, max_rank=64):
    return load_adapter(LoRARequest("t", 1, str(path)), base, max_rank)


def _copy(src, dst, config_edit=None, tensors_edit=None):
    shutil.copytree(src, dst)
    if config_edit:
        cfg = json.load(open(os.path.join(dst, "adapter_config.json")))
        cfg.update(config_edit)
        json.dump(cfg, open(os.path.join(dst, "adapter_config.json"), "w"))
    if tensors_edit:
        st = os.path.join(dst, "adapter_model.safetensors")
        tensors = tensors_edit(load_file(st))
        save_file(tensors, st)
    return dst


def test_modules_ranks_and_scaling(lora_setup, base):
    _, paths = lora_setup
    qv = _load(paths["qv8"], base)
    assert qv.rank == 8 and {m for _, m in qv.modules} == {"q_proj", "v_proj"}
    assert len(qv.modules) == 2 * base.num_layers
    assert qv.modules[(0, "q_proj")].scaling == 16 / 8
    rs = _load(paths["kogate16"], base)
    assert rs.modules[(1, "gate_proj")].scaling == pytest.approx(8 / 16 ** 0.5)  # rslora
    assert rs.modules[(1, "gate_proj")].b.abs().sum() > 0  # B is not zero: the adapter matters


def test_bin_loads_safely(lora_setup, base, tmp_path):
    _, paths = lora_setup
    dst = _copy(paths["qv8"], tmp_path / "bin")
    tensors = load_file(os.path.join(dst, "adapter_model.safetensors"))
    os.remove(os.path.join(dst, "adapter_model.safetensors"))
    torch.save(tensors, os.path.join(dst, "adapter_model.bin"))
    assert _load(dst, base).rank == 8
    torch.save({"x": object()}, os.path.join(dst, "adapter_model.bin"))  # not only tensors
    with pytest.raises(ValueError, match="adapter_model.bin is corrupt or holds more than tensors"):
        _load(dst, base)


@pytest.mark.parametrize("case,match", [
    ("dora", "DoRA"), ("modules_to_save", "saves whole modules"), ("rank", "--max-lora-rank 32"),
    ("mismatch", "trained for another base model"), ("corrupt", "corrupt or unreadable"),
    ("embedding", "not a LoRA A/B matrix"), ("missing", "does not exist"),
    ("layer", "trained for another model")])
def test_refusals(lora_setup, base, tmp_path, case, match):
    _, paths = lora_setup
    src, max_rank = paths["all32"], 64
    if case == "dora":
        path = _copy(src, tmp_path / case, {"use_dora": True})
    elif case == "modules_to_save":
        path = _copy(src, tmp_path / case, {"modules_to_save": ["lm_head"]})
    elif case == "rank":
        path, max_rank = src, 16
    elif case == "mismatch":
        path = _copy(src, tmp_path / case, tensors_edit=lambda t: {
            k: (v[:, :-1].contiguous() if "q_proj.lora_A" in k else v) for k, v in t.items()})
    elif case == "corrupt":
        path = _copy(src, tmp_path / case)
        with open(os.path.join(path, "adapter_model.safetensors"), "r+b") as f:
            f.truncate(100)
    elif case == "embedding":
        path = _copy(src, tmp_path / case, tensors_edit=lambda t: {
            **t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 384)})
    elif case == "layer":
        path = _copy(src, tmp_path / case, tensors_edit=lambda t: {
            k.replace("layers.1.", "layers.7."): v for k, v in t.items()})
    else:
        path = tmp_path / "nothing-here"
    with pytest.raises(ValueError, match=match) as err:
        _load(path, base, max_rank)
    assert str(err.value).count(".") >= 1 and "\n" not in str(err.value)


def test_server_checks_adapters_against_a_gguf_model(tmp_path):
    """The server reads the base shapes of a .gguf model as the engine does (not with
    AutoConfig, which cannot read one): an adapter that fits is accepted, others refused."""
    from tessellm.entrypoints.openai.lora_modules import LoRAModules
    from tessellm.loader.default_model import default_model_path

    modules = LoRAModules("base", default_model_path(), 64)
    key = "base_model.model.model.layers.0.self_attn.{}.lora_{}.weight"
    for name, module, out in (("fits", "q_proj", 576), ("fused", "qkv_proj", 576 + 2 * 192)):
        path = tmp_path / name
        path.mkdir()
        save_file({key.format(module, "A"): torch.zeros(4, 576),
                   key.format(module, "B"): torch.zeros(out, 4)},
                  str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    assert modules.add("fits", str(tmp_path / "fits")).lora_name == "fits"
    with pytest.raises(ValueError, match=r"adapts self_attn\.qkv_proj .*LlamaForCausalLM"):
        modules.add("fused", str(tmp_path / "fused"))


@pytest.mark.parametrize("extra, match", [
    (dict(target_modules=["embed_tokens", "q_proj"]),
     r"adapts the embeddings or the LM head \(target_modules \['embed_tokens'\]\)"),
    (dict(target_modules=["q_proj", "lm_head"]), r"LM head \(target_modules \['lm_head'\]\)"),
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "saves whole modules"),
    (dict(target_modules=["q_proj"], bias="lora_only"), "bias"),
], ids=["embedding", "lm_head", "modules_to_save", "bias"])
def test_peft_adapters_beyond_the_projections_are_refused(lora_setup, base, tmp_path, extra, match):
    """Adapters as peft writes them (not edited by hand) that train embeddings, the LM head,
    whole saved modules or biases: one sentence naming the problem, before any slot is used."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, _ = lora_setup
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    get_peft_model(hf, LoraConfig(r=4, init_lora_weights=False, **extra)).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=match) as err:
        _load(tmp_path, base)
    assert "\n" not in str(err.value)


def test_peft_adapter_on_some_layers_loads(lora_setup, base, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, _ = lora_setup
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["v_proj", "down_proj"], layers_to_transform=[1],
                        init_lora_weights=False)
    get_peft_model(hf, config).save_pretrained(str(tmp_path))
    assert set(_load(tmp_path, base).modules) == {(1, "v_proj"), (1, "down_proj")}
