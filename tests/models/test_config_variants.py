"""Config variants of the families we serve, as real checkpoints use them: greedy tokens and
per-token log-probabilities equal HF transformers' in float32 on tiny random models (cpu
backend), or a refusal at load naming the config field and value."""

from __future__ import annotations

import pytest

from tests.models.variant_parity import TINY, assert_parity, prompts, save_tiny

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def _config(family: str, **overrides):
    import transformers

    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
           "qwen3": "Qwen3Config", "phi3": "Phi3Config", "mixtral": "MixtralConfig",
           "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig",
           "gemma3": "Gemma3TextConfig"}[family]
    kwargs = dict(TINY)
    if family == "phi3":
        kwargs.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):  # 4 experts, top 2
        kwargs.update(num_experts_per_tok=2, num_local_experts=4, num_experts=4,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48)
    if family == "gemma3":
        kwargs.update(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                      layer_types=["sliding_attention", "full_attention"])
    kwargs.update(overrides)
    return getattr(transformers, cls)(**kwargs)


# name -> (family, config overrides, prompt lengths[, engine arguments]). Prompts cross the
# windows (8) and the original lengths (32) the variants set; decoding crosses them too.
CHUNKED = dict(max_num_batched_tokens=8)  # prompts prefilled in chunks smaller than the window
VARIANTS = {
    # rotary
    "llama-rope-linear": ("llama", dict(rope_scaling={"type": "linear", "factor": 4.0}), (5, 30)),
    "llama-rope-dynamic": ("llama", dict(rope_scaling={"type": "dynamic", "factor": 2.0},
                                         max_position_embeddings=48), (5, 30)),
    "llama3-rope-parameters": ("llama", dict(rope_parameters={**LLAMA3, "rope_theta": 500000.0}),
                               (5, 40)),
    # Qwen2.5 long context: max_position_embeddings = the original length, served 4x as far
    "qwen2-yarn-original": ("qwen2", dict(max_position_embeddings=32, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}), (5, 40)),
    "llama-yarn-no-original": ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                              "rope_theta": 10000.0}), (5, 40)),
    "qwen3-yarn-attention-factor": ("qwen3", dict(head_dim=32, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "attention_factor": 1.3, "beta_fast": 16,
        "original_max_position_embeddings": 32}), (5, 40)),
    # attention shape, biases, embeddings
    "llama-attention-and-mlp-bias": ("llama", dict(attention_bias=True, mlp_bias=True), (5, 20)),
    "llama-mqa-head-dim-32": ("llama", dict(num_key_value_heads=1, head_dim=32), (5, 20)),
    "llama-gqa-4-tied": ("llama", dict(num_key_value_heads=1, num_attention_heads=4,
                                       tie_word_embeddings=True), (5, 20)),
    "qwen3-attention-bias": ("qwen3", dict(head_dim=32, attention_bias=True), (5, 20)),
    # sliding windows, prompts and decoding past them
    "mistral-window-head-dim": ("mistral", dict(sliding_window=8, head_dim=32), (5, 20), CHUNKED),
    "qwen2-window-upper-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=8,
                                                max_window_layers=1), (5, 20), CHUNKED),
    "qwen3-window-all-layers": ("qwen3", dict(head_dim=16, use_sliding_window=True,
                                              sliding_window=8, max_window_layers=0), (5, 20)),
    "qwen2-window-off": ("qwen2", dict(use_sliding_window=False, sliding_window=8), (20,)),
    # Phi-3: fused checkpoint tensors; window; partial rotary (Phi-4-mini); LongRoPE up to its
    # original length (past it HF recomputes the whole sequence with the long factors:
    # test_longrope_long_factors_match_hf checks those)
    "phi3-window-tied": ("phi3", dict(sliding_window=8, tie_word_embeddings=True), (5, 20)),
    "phi3-partial-rotary": ("phi3", dict(partial_rotary_factor=0.75), (5, 30)),
    "phi3-longrope-partial-crossing": ("phi3", dict(
        partial_rotary_factor=0.5, original_max_position_embeddings=32,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.2 * i for i in range(4)],
                      "long_factor": [1.5 + 0.5 * i for i in range(4)]}), (5, 20)),
    # MoE
    "mixtral-window-mqa-tied": ("mixtral", dict(sliding_window=8, num_key_value_heads=1,
                                                tie_word_embeddings=True), (5, 20)),
    "qwen2-moe-sparse-step-no-qkv-bias-window": ("qwen2_moe", dict(
        decoder_sparse_step=2, norm_topk_prob=True, qkv_bias=False, use_sliding_window=True,
        sliding_window=8, max_window_layers=2), (5, 20)),
    "qwen3-moe-dense-first-window-bias": ("qwen3_moe", dict(
        head_dim=32, mlp_only_layers=[0], norm_topk_prob=False, attention_bias=True,
        use_sliding_window=True, sliding_window=8), (5, 20)),
    # Gemma 3: local/global layers, logit soft-cap, biases, yarn on the global layers
    "gemma3-softcap-bias-yarn": ("gemma3", dict(
        final_logit_softcapping=5.0, attention_bias=True, num_key_value_heads=1,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 32,
                                            "rope_theta": 1000000.0}}), (5, 40)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_hf(name, tmp_path):
    family, overrides, lengths, *engine = VARIANTS[name]
    path = save_tiny(_config(family, **overrides), str(tmp_path / name))
    assert_parity(path, prompts(lengths), max_new=12, **(engine[0] if engine else {}))


def test_biases_under_tensor_parallelism(tmp_path):
    """attention_bias + mlp_bias at tensor_parallel_size=2 (gloo workers): o_proj and down_proj
    then sum over the ranks themselves (the bias is added once, after), so the next norms must
    not sum again."""
    _, overrides, lengths, *_ = VARIANTS["llama-attention-and-mlp-bias"]
    path = save_tiny(_config("llama", **overrides), str(tmp_path / "tp"))
    assert_parity(path, prompts(lengths), max_new=8, tensor_parallel_size=2, device="cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_loads_as_float32(dtype, tmp_path):
    import torch

    path = save_tiny(_config("qwen2"), str(tmp_path / dtype), dtype=getattr(torch, dtype))
    assert_parity(path, prompts((5, 20)), max_new=8)


def test_longrope_long_factors_match_hf():
    """Past original_max_position_embeddings HF rotates every position with the long factors
    (Phi-3 recomputes the cache when a sequence crosses it); our cache rows from there on hold
    exactly those, and the rows below it the short ones."""
    import torch
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from tessellm.backends.reference.ops import ReferenceOps
    from tessellm.layers.rotary import RotaryEmbedding

    overrides = VARIANTS["phi3-longrope-partial-crossing"][1]
    config = _config("phi3", **overrides)
    hf = Phi3RotaryEmbedding(config)
    ours = RotaryEmbedding.from_config(config, 16, ReferenceOps()).cos_sin_cache
    half = ours.shape[1] // 2
    x = torch.zeros(1)
    for length, rows in ((32, slice(0, 32)), (100, slice(32, 100))):
        cos, sin = hf(x, torch.arange(length)[None])
        torch.testing.assert_close(ours[rows, :half], cos[0, rows, :half])
        torch.testing.assert_close(ours[rows, half:], sin[0, rows, :half])


def test_transformers4_rope_scaling_form_reads_like_rope_parameters():
    """A config object as transformers 4 made it (``rope_theta`` and ``rope_scaling`` beside
    each other, no ``rope_parameters``) gives the same rotary as transformers 5's form."""
    from types import SimpleNamespace

    import torch

    from tessellm.backends.reference.ops import ReferenceOps
    from tessellm.layers.rotary import RotaryEmbedding

    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    v5 = _config("qwen2", rope_theta=50000.0, rope_scaling=dict(scaling))
    v4 = SimpleNamespace(rope_theta=50000.0, rope_scaling=dict(scaling), partial_rotary_factor=None,
                         max_position_embeddings=v5.max_position_embeddings)
    a = RotaryEmbedding.from_config(v5, 16, ReferenceOps()).cos_sin_cache
    b = RotaryEmbedding.from_config(v4, 16, ReferenceOps()).cos_sin_cache
    torch.testing.assert_close(a, b, rtol=0, atol=0)


ARCHITECTURES = {"llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM"}

def test_gemma3_transformers4_rope_fields():
    """Gemma 3 as transformers 4 configured it: rope_local_base_freq for the local layers,
    rope_theta and rope_scaling for the global ones; the same caches as the 5 form."""
    from types import SimpleNamespace

    import torch

    from tessellm.backends.reference.ops import ReferenceOps
    from tessellm.models.gemma3 import _rotary, layer_types

    v5 = _config("gemma3", rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})
    v4 = SimpleNamespace(rope_local_base_freq=20000.0, rope_theta=1000000.0,
                         rope_scaling={"rope_type": "linear", "factor": 8.0}, head_dim=16,
                         max_position_embeddings=v5.max_position_embeddings)
    for kind in ("sliding_attention", "full_attention"):
        torch.testing.assert_close(_rotary(v4, kind, ReferenceOps()).cos_sin_cache,
                                   _rotary(v5, kind, ReferenceOps()).cos_sin_cache, rtol=0, atol=0)
    v4.num_hidden_layers, v4.sliding_window_pattern = 7, 3  # before layer_types (< 4.53)
    assert layer_types(v4) == ["sliding_attention", "sliding_attention", "full_attention"] * 2 + [
        "sliding_attention"]


# family, config overrides, what the one-sentence refusal says
REFUSED = {
    "rope-type": ("llama", dict(rope_parameters={"rope_type": "proportional", "factor": 2.0,
                                                 "rope_theta": 10000.0}),
                  "rope_type 'proportional' is not supported"),
    "gemma3-attn-softcap": ("gemma3", dict(attn_logit_softcapping=50.0),
                            "attn_logit_softcapping=50.0 is not supported"),
    "gemma3-bidirectional": ("gemma3", dict(use_bidirectional_attention=True),
                             "use_bidirectional_attention=True .* is not supported"),
    "llama-gelu": ("llama", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_variant_refused_at_load(name, tmp_path):
    from tessellm import LLM

    family, overrides, message = REFUSED[name]
    config = _config(family, **overrides)
    config.architectures = [ARCHITECTURES[family]]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        LLM(str(tmp_path), load_format="dummy", dtype="float32")


def _rewrite(path: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(f"{path}/model.safetensors")
    edit(tensors)
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("family, edit, message", [
    ("llama", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
     "no 'layers.1.self_attn.k_proj.weight' .* is it complete"),
    ("llama", lambda t: t.pop("model.layers.0.mlp.down_proj.weight"),
     r"lacks 1 weights, e.g. \['layers.0.mlp.down_proj.weight'\]"),
    ("llama", lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": t["model.norm.weight"].clone()}),
     "'layers.0.self_attn.q_proj.bias' has no place .*attention_bias"),
    ("llama", lambda t: t.update({"model.layers.0.extra.weight": t["model.norm.weight"].clone()}),
     "'layers.0.extra.weight' has no place in LlamaForCausalLM"),
    ("qwen3_moe", lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
     "no up .* of expert 3 in layers.1.mlp.experts"),
], ids=["missing-k_proj", "missing-down_proj", "unexpected-bias", "extra-tensor", "missing-expert"])
def test_checkpoint_tensor_names_checked(family, edit, message, tmp_path):
    from tessellm import LLM

    path = save_tiny(_config(family), str(tmp_path / family))
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=message):
        LLM(path, dtype="float32")
