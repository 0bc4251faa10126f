"""GGUF files of the qwen3, qwen2moe, qwen3moe, gemma, gemma2, olmo2, command-r, exaone, glm4,
starcoder2, phi2, phi3, gptneox and falcon architectures, written from tiny random HF models the
way llama.cpp's converter lays them out (``gguf_export.py``: the ``gguf`` package's own HF ->
GGUF tensor names): the config read from the file and every tensor equal the source model's,
and the engine serving the file gives HF transformers' greedy tokens and per-token
log-probabilities (float32, from the source safetensors) under chunked prefill."""

from __future__ import annotations

import os

import pytest
import torch

from tests.models.gguf_export import export_gguf
from tests.models.variant_parity import TINY, hf_reference, ours, prompts, save_tiny


def qwen3():
    from transformers import Qwen3Config

    return Qwen3Config(**{**TINY, "rms_norm_eps": 1e-6, "pad_token_id": 0, "bos_token_id": 1,
                          "eos_token_id": 2})


def starcoder2(**overrides):
    from transformers import Starcoder2Config

    return Starcoder2Config(**{**TINY, "tie_word_embeddings": True, "norm_epsilon": 1e-5,
                               "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                               **overrides})


def phi2():
    from transformers import PhiConfig

    return PhiConfig(**{**TINY, "num_key_value_heads": 4, "pad_token_id": 0, "bos_token_id": 1,
                        "eos_token_id": 2})  # partial rotary 0.5, gelu_new, lm_head bias


def phi3():
    from transformers import Phi3Config

    return Phi3Config(**{**TINY, "sliding_window": 8, "partial_rotary_factor": 0.5,
                         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})


def gptneox(**overrides):
    from transformers import GPTNeoXConfig

    config = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}
    return GPTNeoXConfig(**{**config, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5}, **overrides})


def falcon(**overrides):
    from tests.models.test_falcon import falcon_config

    return falcon_config(**overrides)


def moe(name: str):
    """A tiny Qwen MoE config with every layer sparse (llama.cpp's qwen2moe has no dense
    layers)."""
    from tests.models.tiny_moe import moe_configs

    def make():
        config = moe_configs()[name]
        config.mlp_only_layers = []
        return config

    return make


def _moe_meta(config_name: str) -> dict:
    """What llama.cpp's converter writes for a Qwen MoE config (expert sizes and counts)."""
    from tests.models.tiny_moe import moe_configs

    config = moe_configs()[config_name]
    meta = {"attention.layer_norm_rms_epsilon": (config.rms_norm_eps, "add_float32"),
            "expert_count": (config.num_experts, "add_uint32"),
            "expert_used_count": (config.num_experts_per_tok, "add_uint32"),
            "expert_feed_forward_length": (config.moe_intermediate_size, "add_uint32")}
    if getattr(config, "shared_expert_intermediate_size", 0):
        meta["expert_shared_feed_forward_length"] = (config.shared_expert_intermediate_size,
                                                     "add_uint32")
    return meta


_GEMMA = {**TINY, "tie_word_embeddings": True, "head_dim": 32, "rms_norm_eps": 1e-6,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # head_dim != hidden / heads


def gemma():
    from transformers import GemmaConfig

    return GemmaConfig(**_GEMMA)


def gemma2():
    from transformers import Gemma2Config

    # llama.cpp scales queries by 1/sqrt(head_dim) (but the 27B's); soft-caps sharper than the
    # defaults so that they matter at this size
    return Gemma2Config(**_GEMMA, query_pre_attn_scalar=32, sliding_window=8,
                        attn_logit_softcapping=5.0, final_logit_softcapping=3.0)


def olmo2():
    from transformers import Olmo2Config

    return Olmo2Config(**{**TINY, "rms_norm_eps": 1e-6, "pad_token_id": 0, "bos_token_id": 1,
                          "eos_token_id": 2})


def cohere(**overrides):
    from transformers import CohereConfig

    return CohereConfig(**{**TINY, "tie_word_embeddings": True, "logit_scale": 0.5,
                           "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **overrides})


def exaone():
    from transformers import ExaoneConfig

    return ExaoneConfig(**{**TINY, "rms_norm_eps": 1e-5, "pad_token_id": 0, "bos_token_id": 1,
                           "eos_token_id": 2})


def glm4():
    from transformers import Glm4Config

    return Glm4Config(**{**TINY, "rms_norm_eps": 1e-5, "partial_rotary_factor": 0.5,
                         "attention_bias": True, "pad_token_id": 0, "bos_token_id": 1,
                         "eos_token_id": 2})


_COHERE_META = {"attention.layer_norm_epsilon": (1e-5, "add_float32"),
                "logit_scale": (0.5, "add_float32")}
_RMS_META = {"attention.layer_norm_rms_epsilon": (1e-6, "add_float32")}
_NEOX_META = {"attention.layer_norm_epsilon": (1e-5, "add_float32")}
CASES = {
    "qwen3": (qwen3, {"attention.layer_norm_rms_epsilon": (1e-6, "add_float32")}),
    "starcoder2": (starcoder2, {"attention.layer_norm_epsilon": (1e-5, "add_float32")}),
    "starcoder2-no-bias": (lambda: starcoder2(use_bias=False, tie_word_embeddings=False),
                           {"attention.layer_norm_epsilon": (1e-5, "add_float32")}),
    "phi2": (phi2, {"attention.layer_norm_epsilon": (1e-5, "add_float32")}),
    "phi3": (phi3, {"attention.layer_norm_rms_epsilon": (1e-5, "add_float32"),
                    "attention.sliding_window": (8, "add_uint32")}),
    # llama.cpp's converter writes use_parallel_residual and layer_norm_eps; the q/k/v rows
    # regrouped [q | k | v] (gguf_export.py)
    "gptneox": (gptneox, {**_NEOX_META, "use_parallel_residual": (True, "add_bool")}),
    "gptneox-sequential": (lambda: gptneox(use_parallel_residual=False),
                           {**_NEOX_META, "use_parallel_residual": (False, "add_bool")}),
    # 7B's multi-query block on one norm (tied head); 40B's KV groups and two norms, whose
    # ln_attn / ln_mlp the gguf name map writes as attn_norm_2 / attn_norm
    "falcon": (falcon, _NEOX_META),
    "falcon-40b": (lambda: falcon(new_decoder_architecture=True, num_kv_heads=2,
                                  tie_word_embeddings=False), _NEOX_META),
    # stacked ffn_*_exps experts; qwen2moe with a shared expert, qwen3moe with q/k norms
    # and renormalized top-k
    "qwen2moe": (moe("qwen2-moe"), _moe_meta("qwen2-moe")),
    # norms stored 1 + w; gemma2's soft-caps and window as its converter writes them
    "gemma": (gemma, _RMS_META),
    "gemma2": (gemma2, {**_RMS_META, "attn_logit_softcapping": (5.0, "add_float32"),
                        "final_logit_softcapping": (3.0, "add_float32"),
                        "attention.sliding_window": (8, "add_uint32")}),
    "olmo2": (olmo2, _RMS_META),
    # Command-R (logit_scale, interleaved rotary) and Command-R+ (per-head q/k norms)
    "command-r": (cohere, _COHERE_META),
    "command-r-plus": (lambda: cohere(use_qk_norm=True), _COHERE_META),
    "exaone": (exaone, {"attention.layer_norm_rms_epsilon": (1e-5, "add_float32")}),
    "glm4": (glm4, {"attention.layer_norm_rms_epsilon": (1e-5, "add_float32")}),
    "qwen3moe": (moe("qwen3-moe"), _moe_meta("qwen3-moe")),
}


def _checkpoint_names(config, tensors: dict) -> dict:
    """The source's tensors under the names the GGUF loader yields: HF's, except GPT-NeoX's,
    Falcon's and EXAONE's, which the model renames (and cuts) (``checkpoint_names``)."""
    from types import SimpleNamespace

    from tessellm.models.exaone import ExaoneForCausalLM
    from tessellm.models.falcon import FalconForCausalLM
    from tessellm.models.gpt_neox import GPTNeoXForCausalLM

    model = {"GPTNeoXForCausalLM": GPTNeoXForCausalLM, "FalconForCausalLM": FalconForCausalLM,
             "ExaoneForCausalLM": ExaoneForCausalLM}.get(config.architectures[0])
    if model is None:
        return tensors
    return dict(model.checkpoint_names(SimpleNamespace(config=config), tensors.items()))


def _export(case: str, tmp_path, quantize=()) -> tuple[str, str]:
    make_config, metadata = CASES[case]
    source = save_tiny(make_config(), str(tmp_path / "hf"))
    arch = "command-r" if case.startswith("command-r") else case.split("-")[0]
    return source, export_gguf(source, str(tmp_path / f"{arch}.gguf"), arch, metadata=metadata,
                               quantize=tuple(quantize))


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_family_config_and_weights_equal_the_source(case, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from tessellm.loader.gguf_loader import iter_gguf_weights, load_gguf_config

    source, path = _export(case, tmp_path)
    want, got = AutoConfig.from_pretrained(source), load_gguf_config(path)
    # transformers 5 builds (and saves) EXAONE as its Llama model; the GGUF names EXAONE
    assert got.architectures == (["ExaoneForCausalLM"] if case == "exaone" else want.architectures)
    fields = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps",
              "norm_epsilon", "layer_norm_eps", "use_bias", "sliding_window",
              "use_parallel_residual", "attention_bias", "layer_norm_epsilon", "ffn_hidden_size",
              "new_decoder_architecture", "multi_query", "parallel_attn", "bias",
              "num_experts", "num_experts_per_tok", "moe_intermediate_size",
              "shared_expert_intermediate_size", "norm_topk_prob", "mlp_only_layers",
              "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
              "layer_types", "logit_scale", "use_qk_norm"]
    for field in fields:  # the epsilons are float32 in the file
        expected = getattr(want, field, None)
        if field == "num_key_value_heads":  # GPT-NeoX's config has none: every head its own
            expected = expected or want.num_attention_heads
        assert getattr(got, field, None) == pytest.approx(expected), field
    head_size = [getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
                 for c in (got, want)]
    assert head_size[0] == head_size[1]
    rotary = [c.rope_parameters.get("partial_rotary_factor", 1.0) for c in (got, want)]
    assert rotary[0] == rotary[1]
    theirs = _checkpoint_names(got, load_file(os.path.join(source, "model.safetensors")))
    weights = dict(iter_gguf_weights(path, torch.float32))
    assert set(weights) == set(theirs)
    for name, tensor in weights.items():
        if case.startswith("gemma") and name.endswith("norm.weight"):  # (1 + w) - 1 rounds
            torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("case", ["gemma", "gemma2", "olmo2", "command-r", "command-r-plus",
                                  "exaone", "glm4", "qwen3", "starcoder2", "phi2", "phi3", "gptneox",
                                  "gptneox-sequential", "falcon", "falcon-40b", "qwen2moe",
                                  "qwen3moe"])
def test_gguf_family_serves_like_hf(case, tmp_path):
    source, path = _export(case, tmp_path)
    prompt_list = prompts((5, 30))
    want_tokens, want_lp = hf_reference(source, prompt_list, 16)
    got_tokens, got_lp = ours(path, prompt_list, 16, max_num_batched_tokens=8)
    assert got_tokens == want_tokens
    for got, want in zip(got_lp, want_lp):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_gguf_phi3_longrope_refused(tmp_path):
    import numpy as np

    from tessellm.loader.gguf_loader import load_gguf_config

    make_config, metadata = CASES["phi3"]
    source = save_tiny(make_config(), str(tmp_path / "hf"))
    factors = {f"rope_factors_{k}.weight": np.ones(4, dtype=np.float32) for k in ("long", "short")}
    path = export_gguf(source, str(tmp_path / "phi3.gguf"), "phi3", metadata=metadata,
                       extra=factors)
    with pytest.raises(ValueError, match="Phi-3 GGUF files with LongRoPE factors .* not supported"):
        load_gguf_config(path)


def test_gguf_starcoder2_q8_0_kept_quantized_serves_like_hf(tmp_path, monkeypatch):
    """``quantization="gguf"``: the Q8_0 projections stay in their blocks (c_fc / c_proj /
    q / o among them) and the engine matches HF transformers loading the same file
    (which dequantizes it). The cpu backend's float32 quantized product
    (``TESSELLM_CPU_INT4PACK=0``; its default rounds activations to bfloat16)."""
    monkeypatch.setenv("TESSELLM_CPU_INT4PACK", "0")
    from tessellm.loader.gguf_loader import load_gguf_config

    make_config, metadata = CASES["starcoder2"]
    source = save_tiny(make_config(), str(tmp_path / "hf"))
    quantized = tuple(f"blk.{i}.{part}.weight" for i in range(2)
                      for part in ("attn_q", "attn_output", "ffn_up", "ffn_down"))
    path = export_gguf(source, str(tmp_path / "starcoder2.gguf"), "starcoder2",
                       metadata=metadata, quantize=quantized)
    assert load_gguf_config(path).use_bias
    from tessellm import LLM
    from tessellm.quantization.loading import quantized_linears
    from tessellm.quantization.packed import Int8Weight

    with LLM(path, dtype="float32", quantization="gguf") as llm:
        layers = quantized_linears(llm.engine.core.runner.model)
        for name in ("mlp.fc_in", "mlp.fc_out", "self_attn.o_proj"):
            assert all(isinstance(s, Int8Weight) for s in layers[f"layers.1.{name}"].segments)
    prompt_list = prompts((5, 30))
    want_tokens, want_lp = hf_reference(str(tmp_path), prompt_list, 16,
                                        gguf_file="starcoder2.gguf")
    got_tokens, got_lp = ours(path, prompt_list, 16, quantization="gguf")
    assert got_tokens == want_tokens
    for got, want in zip(got_lp, want_lp):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_gguf_phi3_q8_0_fused_kept_quantized(tmp_path, monkeypatch):
    """``quantization="gguf"`` keeps Phi-3's fused Q8_0 ``attn_qkv`` / ``ffn_up`` in their blocks
    (as our fused qkv_proj / gate_up_proj, uncut) and serves what the dequantized file serves
    (whose parity with HF ``test_gguf_family_serves_like_hf`` checks); float32 products."""
    from tessellm import LLM
    from tessellm.quantization.loading import quantized_linears
    from tessellm.quantization.packed import Int8Weight

    monkeypatch.setenv("TESSELLM_CPU_INT4PACK", "0")
    make_config, metadata = CASES["phi3"]
    source = save_tiny(make_config(), str(tmp_path / "hf"))
    quantized = tuple(f"blk.{i}.{part}.weight" for i in range(2)
                      for part in ("attn_qkv", "ffn_up", "ffn_down"))
    path = export_gguf(source, str(tmp_path / "phi3.gguf"), "phi3", metadata=metadata,
                       quantize=quantized)
    with LLM(path, dtype="float32", quantization="gguf") as llm:
        layers = quantized_linears(llm.engine.core.runner.model)
        for name in ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            assert all(isinstance(s, Int8Weight) for s in layers[f"layers.0.{name}"].segments)
    _assert_serves_like_dequantized(path)


@pytest.mark.parametrize("case", ["gptneox", "falcon-40b"])
def test_gguf_fused_qkv_q8_0_kept_quantized(case, tmp_path, monkeypatch):
    """``quantization="gguf"``: GPT-NeoX's and Falcon's Q8_0 ``attn_qkv`` is cut into q, k and
    v by rows (whole blocks; Falcon's k and v have fewer heads than q) and stays quantized, as
    do ``attn_output`` and the MLP's two projections; the engine serves what the dequantized
    file serves (float32 products)."""
    from tessellm import LLM
    from tessellm.quantization.loading import quantized_linears
    from tessellm.quantization.packed import Int8Weight

    monkeypatch.setenv("TESSELLM_CPU_INT4PACK", "0")
    make_config, metadata = CASES[case]
    arch = case.split("-")[0]
    source = save_tiny(make_config(), str(tmp_path / "hf"))
    quantized = tuple(f"blk.{i}.{part}.weight" for i in range(2)
                      for part in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"))
    path = export_gguf(source, str(tmp_path / f"{arch}.gguf"), arch, metadata=metadata,
                       quantize=quantized)
    with LLM(path, dtype="float32", quantization="gguf") as llm:
        layers = quantized_linears(llm.engine.core.runner.model)
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.fc_in", "mlp.fc_out"):
            assert all(isinstance(s, Int8Weight) for s in layers[f"layers.1.{name}"].segments), name
    _assert_serves_like_dequantized(path)


def _assert_serves_like_dequantized(path: str) -> None:
    """The file served with its blocks kept (``quantization="gguf"``) gives the greedy tokens
    and logprobs of the same file dequantized at load."""
    prompt_list = prompts((5, 30))
    want_tokens, want_lp = ours(path, prompt_list, 16)
    got_tokens, got_lp = ours(path, prompt_list, 16, quantization="gguf")
    assert got_tokens == want_tokens
    for got, want in zip(got_lp, want_lp):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


_QODU = ("attn_q", "attn_output", "ffn_up", "ffn_down")
# case: (GGUF tensors written Q8_0 in each layer, our linears wholly in blocks, partly in blocks)
KEPT = {
    # MoE: the attention keeps its blocks, the stacked Q8_0 experts are dequantized at load
    "qwen3moe": (("attn_q", "attn_output", "ffn_gate_exps", "ffn_up_exps"),
                 ("self_attn.o_proj",), ("self_attn.qkv_proj",)),
    **{case: (_QODU, ("self_attn.o_proj", "mlp.down_proj"), ("self_attn.qkv_proj",))
       for case in ("gemma2", "olmo2", "command-r-plus", "exaone", "glm4")},  # glm4: gate_up
}


@pytest.mark.parametrize("case", list(KEPT))
def test_gguf_q8_0_kept_quantized(case, tmp_path, monkeypatch):
    """``quantization="gguf"``: the Q8_0 projections stay in their blocks (q among q/k/v, so
    ``qkv_proj`` partly) and the engine serves what the dequantized file serves (float32)."""
    from tessellm import LLM
    from tessellm.quantization.loading import quantized_linears
    from tessellm.quantization.packed import Int8Weight

    monkeypatch.setenv("TESSELLM_CPU_INT4PACK", "0")
    parts, whole, partly = KEPT[case]
    _, path = _export(case, tmp_path, [f"blk.{i}.{p}.weight" for i in range(2) for p in parts])
    with LLM(path, dtype="float32", quantization="gguf") as llm:
        layers = quantized_linears(llm.engine.core.runner.model)
        kept = {n: [isinstance(s, Int8Weight) for s in layers[f"layers.1.{n}"].segments]
                for n in whole + partly}
    assert all(all(kept[n]) for n in whole) and all(any(kept[n]) for n in partly), kept
    _assert_serves_like_dequantized(path)


@pytest.mark.parametrize("case", ["gemma2", "exaone"])
def test_gguf_end_of_turn_token_is_a_stop_id(case, tmp_path):
    """A file naming an end-of-turn token apart from eos (``tokenizer.ggml.eot_token_id``:
    Gemma's ``<end_of_turn>``, Llama 3's ``<|eot_id|>``) stops at either, as llama.cpp does
    (the engine's stop ids, ``generation_eos_ids``)."""
    from tessellm.config import generation_eos_ids, resolve_model
    from tessellm.loader.gguf_loader import load_gguf_config

    make_config, metadata = CASES[case]
    arch = case.split("-")[0]
    source = save_tiny(make_config(), str(tmp_path / "hf"))
    meta = {**metadata, "tokenizer.ggml.eot_token_id": (7, "add_uint32")}
    path = export_gguf(source, str(tmp_path / f"{arch}.gguf"), arch, metadata=meta)
    assert load_gguf_config(path).eos_token_id == [2, 7]
    assert generation_eos_ids(resolve_model(path)) == [2, 7]
    _, plain = _export(case, tmp_path / "plain")
    assert load_gguf_config(plain).eos_token_id == 2
