"""DeepSeek's parts on their own: the routers against HF's router modules, the latent KV cache's
size (one row of ``kv_lora_rank + qk_rope_head_dim`` a token and layer, so many more blocks than
an MHA model of the same shape), and what is refused at load (configs we do not implement, MLA
on a backend whose kernel does not declare ``supports_mla``)."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM
from tests.models.test_deepseek import deepseek_config
from tests.models.variant_parity import TINY, assert_refused_at_load
from tessellm.models.moe_routing import route_v2, route_v3


def _sorted(weights, ids):
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


@pytest.mark.parametrize("v3, overrides", [
    (False, dict(topk_method="greedy")),
    (False, dict(topk_method="group_limited_greedy", n_group=4, topk_group=1,
                 routed_scaling_factor=1.5)),
    (True, dict(norm_topk_prob=True)),
    (True, dict(norm_topk_prob=False, n_group=2, topk_group=1, num_experts_per_tok=3)),
], ids=["v2-greedy", "v2-grouped", "v3-renormalized", "v3-two-groups"])
def test_router_matches_hf(v3, overrides):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = deepseek_config(v3, **overrides)
    hf = (DeepseekV3TopkRouter if v3 else DeepseekV2TopkRouter)(config)
    torch.manual_seed(7)
    with torch.no_grad():
        hf.weight.normal_(0, 0.5)
        if v3:
            hf.e_score_correction_bias.uniform_(-0.5, 0.5)
    x = torch.randn(64, config.hidden_size)
    logits, want_w, want_ids = hf(x)
    if v3:
        got = route_v3(logits, hf.e_score_correction_bias, config.num_experts_per_tok,
                       config.n_group, config.topk_group, config.norm_topk_prob,
                       config.routed_scaling_factor)
    else:
        got = route_v2(logits, config.num_experts_per_tok, config.topk_method,
                       config.n_group or 1, config.topk_group or 1, config.routed_scaling_factor)
    want_w, want_ids = _sorted(want_w, want_ids)
    got_w, got_ids = _sorted(*got)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)


def test_latent_cache_gives_more_blocks(tmp_path, monkeypatch):
    """Same budget, same layers, heads and hidden size: the MLA model caches 40 values a token
    and layer (kv_lora_rank 32 + rope 8), a Llama with head_dim 24 caches 2 * 4 * 24 = 192."""
    from transformers import LlamaConfig

    monkeypatch.setenv("TESSELLM_CPU_KV_CACHE_GB", str(1 / 1024))  # 1 MiB
    budget = 1 << 20
    ds = deepseek_config(True)
    ds.architectures = ["DeepseekV3ForCausalLM"]
    ds.save_pretrained(tmp_path / "ds")
    llama = LlamaConfig(**{**TINY, "num_key_value_heads": 4, "head_dim": 24})
    llama.architectures = ["LlamaForCausalLM"]
    llama.save_pretrained(tmp_path / "llama")
    blocks = {}
    for name in ("ds", "llama"):
        with LLM(str(tmp_path / name), load_format="dummy", dtype="float32",
                 block_size=16) as llm:
            blocks[name] = llm.engine.core.kv.num_blocks
    layers, elem = TINY["num_hidden_layers"], 4
    assert blocks["ds"] == budget // (layers * 16 * (32 + 8) * elem)
    assert blocks["llama"] == budget // (layers * 16 * 2 * 4 * 24 * elem)
    assert blocks["ds"] >= 4 * blocks["llama"]


@pytest.mark.parametrize("v3, overrides, match", [
    (False, dict(topk_method="noaux_tc"), "topk_method 'noaux_tc' is not supported"),
    (False, dict(norm_topk_prob=True), "norm_topk_prob=true is not supported"),
    (True, dict(n_group=3), "does not split into n_group 3"),
    (False, dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
], ids=["v2-method", "v2-norm-topk", "v3-groups", "act"])
def test_refused_configs(v3, overrides, match, tmp_path):
    arch = "DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"
    assert_refused_at_load(deepseek_config(v3, **overrides), arch, tmp_path / "bad", match)


def test_mla_refused_on_a_backend_without_it(tmp_path):
    """The xpu backend's kernel does not declare supports_mla (emulated on the host): one
    sentence naming the backend, the option and the backends that serve it."""
    config = deepseek_config(True)
    config.architectures = ["DeepseekV3ForCausalLM"]
    config.save_pretrained(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"multi-head latent attention .* backend 'xpu' cannot "
                                         r"do .* supports_mla.*: cpu, cuda, rocm"):
        LLM(str(tmp_path / "ds"), load_format="dummy", dtype="float32", device="xpu",
            emulate=True)


def test_router_stays_float32_in_a_bfloat16_model(tmp_path):
    """V3's checkpoints keep the router bias in float32 beside bfloat16 weights; a bfloat16
    engine keeps it (and the router weight) exactly, as HF does (rounded, some tokens would pick
    other experts)."""
    from safetensors.torch import load_file, save_file

    from tests.models.test_deepseek import save_deepseek

    path = save_deepseek(deepseek_config(True), str(tmp_path / "ds"))
    file = tmp_path / "ds" / "model.safetensors"
    stored = load_file(str(file))
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    stored[bias] = stored[bias] + 1e-3  # off the bfloat16 grid
    save_file({k: v if k == bias else v.to(torch.bfloat16) for k, v in stored.items()},
              str(file), metadata={"format": "pt"})
    with LLM(path, dtype="bfloat16") as llm:
        gate = llm.engine.core.runner.model.layers[1].mlp.gate
        assert gate.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(gate.e_score_correction_bias, stored[bias])
        weight = stored["model.layers.1.mlp.gate.weight"].to(torch.bfloat16).float()
        assert torch.equal(gate.weight, weight)
