"""GGUF architectures that map onto a family tessellm serves from safetensors, beyond llama,
qwen2 and gemma3 (``gguf_loader.py``), with no new quantized kernels: their tensors are the
llama ones under other names, fewer of them, or fused ones the family already cuts.

    qwen3       llama's tensors plus per-head q/k norms (``attn_q_norm`` / ``attn_k_norm``);
                ``attention.key_length`` is the head size (128 in every Qwen3)
    starcoder2  LayerNorms with biases (``attention.layer_norm_epsilon``), biases on every
                projection when the file has them, an MLP without a gate (``ffn_up`` is
                ``c_fc``, ``ffn_down`` ``c_proj``)
    phi2        Phi's parallel block: one LayerNorm with bias (``attn_norm``, no ``ffn_norm``),
                ``ffn_up`` / ``ffn_down`` are ``fc1`` / ``fc2``, the head's bias ``output.bias``;
                partial rotary from ``rope.dimension_count``
    phi3        ``attn_qkv`` and ``ffn_up`` fused as Phi-3's own ``qkv_proj`` / ``gate_up_proj``
                (which ``Phi3ForCausalLM`` cuts), ``attention.sliding_window``, partial rotary;
                LongRoPE files (``rope_factors_long`` / ``rope_factors_short``) are refused
    gptneox     LayerNorms with biases, biases on every projection, a gelu MLP without a gate
                (``ffn_up`` / ``ffn_down``), ``use_parallel_residual``, partial NeoX rotary from
                ``rope.dimension_count``; ``attn_qkv`` holds rows ``[q | k | v]`` (llama.cpp's
                converter regroups HF's per-head ``query_key_value``), cut into q, k and v here
                (``FUSED_ROWS``), so GGUF blocks kept quantized stay whole rows
    falcon      Falcon's parallel block (llama.cpp runs every Falcon file as one), LayerNorms with
                biases, ``attn_qkv`` rows ``[q | k | v]`` (the converter regroups the KV groups;
                cut by head counts); the layer shape from the tensors: with ``attn_norm_2`` two
                norms (40B / 180B: the ``gguf`` name map writes ``ln_attn`` as ``attn_norm_2``
                and ``ln_mlp`` as ``attn_norm``), else one (7B's ``input_layernorm``)

    gemma       llama's tensors; every norm stored as ``1 + w`` (``GEMMA_NORM_PLUS_ONE``: the
                loader yields HF's ``w``); ``attention.key_length`` the head size (256 in 7B,
                not hidden / heads); the head tied to the embedding
    gemma2      gemma's plus four norms a layer (``ffn_norm`` is ``pre_feedforward_layernorm``,
                ``post_attention_norm`` / ``post_ffw_norm`` the sandwich's), soft-caps from
                ``attn_logit_softcapping`` / ``final_logit_softcapping``, the window from
                ``attention.sliding_window`` on alternating layers (HF's default layer types);
                the query scale is not stored: llama.cpp takes 1/sqrt(hidden / heads) for the
                46-layer 27B and 1/sqrt(head size) otherwise, so ``query_pre_attn_scalar`` is that
    olmo2       no pre-norms: ``post_attention_norm`` / ``post_ffw_norm`` after attention and the
                MLP, ``attn_q_norm`` / ``attn_k_norm`` over all heads' rows
    command-r   Cohere: one LayerNorm without bias (``attn_norm``, ``attention.layer_norm_epsilon``)
                feeding the parallel attention and MLP, per-head ``attn_q_norm`` /
                ``attn_k_norm`` when the file has them (Command-R+: ``use_qk_norm``),
                ``logit_scale``; interleaved rotary, which the converter leaves as HF has it
    exaone      EXAONE 3.0 / 3.5: llama's tensors and rotary, not permuted (NeoX in llama.cpp);
                the loader yields llama's names (``ExaoneForCausalLM`` takes them as its renames
                give them); Llama 3 ``rope_freqs`` as for llama (gguf_rope.py)
    glm4        GLM-4-0414: ``ffn_up`` is the fused ``gate_up_proj``, four norms a layer
                (``post_attention_norm`` after attention, ``ffn_norm`` before the MLP,
                ``post_ffw_norm`` after it), partial interleaved rotary from
                ``rope.dimension_count``, q/k/v biases

llama.cpp's converters write no sliding window for starcoder2; HF's GGUF loading sets none
either, so the model attends to the whole context (the safetensors config's 4096-token window
differs only past 4096 tokens).
"""

from __future__ import annotations

# blk.{i}.KEY -> model.layers.{i}.VALUE (overrides of the llama names)
FAMILY_LAYER_NAMES = {
    "qwen3": {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "starcoder2": {"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
    "phi2": {"ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2", "attn_output": "self_attn.dense"},
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "gptneox": {"attn_output": "self_attn.dense", "ffn_up": "mlp.dense_h_to_4h",
                "ffn_down": "mlp.dense_4h_to_h"},
    "falcon": {"attn_output": "self_attn.dense", "ffn_up": "mlp.dense_h_to_4h",
               "ffn_down": "mlp.dense_4h_to_h", "attn_norm_2": "input_layernorm"},
    "gemma2": {"ffn_norm": "pre_feedforward_layernorm",
               "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
    "olmo2": {"post_attention_norm": "post_attention_layernorm",
              "post_ffw_norm": "post_feedforward_layernorm",
              "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "command-r": {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "glm4": {"ffn_up": "mlp.gate_up_proj", "post_attention_norm": "post_self_attn_layernorm",
             "ffn_norm": "post_attention_layernorm", "post_ffw_norm": "post_mlp_layernorm"},
}

# architectures whose norms llama.cpp's converter stores as 1 + w (HF's Gemma norms scale by it)
GEMMA_NORM_PLUS_ONE = ("gemma", "gemma2", "gemma3")

# fused GGUF tensors the loader cuts by rows, read as the tensors named (blk.{i}.KEY ->
# blk.{i}.PART for each part, then FAMILY_LAYER_NAMES / the llama names); q, k, v rows in
# proportion to their head counts (heads : kv heads : kv heads)
FUSED_ROWS = {"gptneox": {"attn_qkv": ("attn_q", "attn_k", "attn_v")},
              "falcon": {"attn_qkv": ("attn_q", "attn_k", "attn_v")}}

# GGUF global tensor name -> HF module name (overrides of the llama names)
FAMILY_GLOBAL_NAMES = {"phi2": {"output_norm": "model.final_layernorm"}}

# the metadata key of the norms' epsilon and the HF config field it fills, where not llama's
NORM_EPSILON = {"starcoder2": ("attention.layer_norm_epsilon", "norm_epsilon"),
                "phi2": ("attention.layer_norm_epsilon", "layer_norm_eps"),
                "gptneox": ("attention.layer_norm_epsilon", "layer_norm_eps"),
                "falcon": ("attention.layer_norm_epsilon", "layer_norm_epsilon"),
                "command-r": ("attention.layer_norm_epsilon", "layer_norm_eps")}


def file_layer_names(arch: str, tensor_names: set) -> dict:
    """Layer names that depend on which tensors the file has (overrides of FAMILY_LAYER_NAMES):
    a two-norm Falcon's ``attn_norm`` is its ``ln_mlp``."""
    if arch == "falcon" and "blk.0.attn_norm_2.weight" in tensor_names:
        return {"attn_norm": "post_attention_layernorm"}
    return {}


def falcon_config(hp, common: dict, tensor_names: set, eos_token_id):
    """``FalconConfig`` of a Falcon file (which takes no ``head_dim`` nor llama's field names):
    two norms (``attn_norm_2``) or KV groups are the new decoder architecture, one KV head
    without them 7B's multi-query block; always parallel (as llama.cpp runs it)."""
    from transformers import FalconConfig

    two_norms = "blk.0.attn_norm_2.weight" in tensor_names
    kv = common["num_key_value_heads"]
    grouped = two_norms or kv > 1
    return FalconConfig(
        architectures=["FalconForCausalLM"], vocab_size=common["vocab_size"],
        hidden_size=common["hidden_size"], ffn_hidden_size=common["intermediate_size"],
        num_hidden_layers=common["num_hidden_layers"],
        num_attention_heads=common["num_attention_heads"], num_kv_heads=kv,
        new_decoder_architecture=grouped, num_ln_in_parallel_attn=2 if two_norms else 1,
        multi_query=True, parallel_attn=True,  # multi_query: one KV head unless grouped
        bias="blk.0.attn_qkv.bias" in tensor_names, alibi=False,
        layer_norm_epsilon=common["layer_norm_epsilon"],
        max_position_embeddings=common["max_position_embeddings"],
        rope_parameters={"rope_type": "default",
                         "rope_theta": float(hp("rope.freq_base", 10000.0))},
        tie_word_embeddings=common["tie_word_embeddings"], bos_token_id=common["bos_token_id"],
        eos_token_id=eos_token_id, pad_token_id=common["pad_token_id"])


def family_fields(arch: str, hp, common: dict, tensor_names: set) -> dict:
    """HF config fields an architecture reads beyond the common ones: ``hp(key, default)``
    reads ``{arch}.{key}``; ``head_dim`` here overrides the loader's own reading."""
    if arch == "starcoder2":
        return {"use_bias": "blk.0.attn_q.bias" in tensor_names}
    if arch == "command-r":
        return {"logit_scale": hp("logit_scale", 1.0),
                "use_qk_norm": "blk.0.attn_q_norm.weight" in tensor_names}
    if arch == "glm4":
        head = hp("attention.key_length", common["hidden_size"] // common["num_attention_heads"])
        return {"head_dim": head, "partial_rotary_factor": hp("rope.dimension_count", head) / head,
                "attention_bias": "blk.0.attn_q.bias" in tensor_names}
    if arch == "gemma2":
        heads, layers = common["num_attention_heads"], common["num_hidden_layers"]
        head = hp("attention.key_length", common["hidden_size"] // heads)
        return {"head_dim": head, "sliding_window": hp("attention.sliding_window", 4096),
                "attn_logit_softcapping": hp("attn_logit_softcapping", None),
                "final_logit_softcapping": hp("final_logit_softcapping", None),
                "query_pre_attn_scalar": common["hidden_size"] // heads if layers == 46 else head}
    if arch == "gptneox":  # GPTNeoXConfig reads the rotary from rope_parameters only
        head = common["hidden_size"] // common["num_attention_heads"]
        rotary = {"rope_type": "default", "rope_theta": float(hp("rope.freq_base", 10000.0)),
                  "partial_rotary_factor": hp("rope.dimension_count", head) / head}
        return {"head_dim": head, "rope_parameters": rotary,
                "use_parallel_residual": bool(hp("use_parallel_residual", True)),
                "attention_bias": "blk.0.attn_qkv.bias" in tensor_names}
    if arch not in ("phi2", "phi3"):
        return {}
    if arch == "phi3" and {"rope_factors_long.weight", "rope_factors_short.weight"} & tensor_names:
        raise ValueError("Phi-3 GGUF files with LongRoPE factors (rope_factors_long / "
                         "rope_factors_short, the 128k models) are not supported; load a "
                         "safetensors copy.")
    head = common["hidden_size"] // common["num_attention_heads"]
    fields = {"head_dim": head, "partial_rotary_factor": hp("rope.dimension_count", head) / head}
    if arch == "phi3":
        fields["sliding_window"] = hp("attention.sliding_window", None)
    return fields
