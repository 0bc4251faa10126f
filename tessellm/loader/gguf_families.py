"""GGUF architectures that map onto a family tessellm serves from safetensors, beyond llama,
qwen2 and gemma3 (``gguf_loader.py``), with no new quantized kernels: their tensors are the
llama ones under other names, or fewer of them.

    qwen3       llama's tensors plus per-head q/k norms (``attn_q_norm`` / ``attn_k_norm``);
                ``attention.key_length`` is the head size (128 in every Qwen3)
    starcoder2  LayerNorms with biases (``attention.layer_norm_epsilon``), biases on every
                projection when the file has them, an MLP without a gate (``ffn_up`` is
                ``c_fc``, ``ffn_down`` ``c_proj``)

llama.cpp's converters write no sliding window for starcoder2; HF's GGUF loading sets none
either, so the model attends to the whole context (the safetensors config's 4096-token window
differs only past 4096 tokens).
"""

from __future__ import annotations

# blk.{i}.KEY -> model.layers.{i}.VALUE (overrides of the llama names)
FAMILY_LAYER_NAMES = {
    "qwen3": {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "starcoder2": {"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
}

# the metadata key of the norms' epsilon and the HF config field it fills, where not llama's
NORM_EPSILON = {"starcoder2": ("attention.layer_norm_epsilon", "norm_epsilon")}


def family_fields(arch: str, tensor_names: set) -> dict:
    """HF config fields an architecture reads from which tensors the file holds."""
    if arch == "starcoder2":
        return {"use_bias": "blk.0.attn_q.bias" in tensor_names}
    return {}
