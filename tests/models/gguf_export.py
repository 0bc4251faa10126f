"""Writes a tiny HF model (a directory saved by ``variant_parity.save_tiny``) as a GGUF file the
way llama.cpp's convert_hf_to_gguf.py lays it out: tensor names from the ``gguf`` package's own
HF -> GGUF name map for the architecture, float32 tensors (or Q8_0 for the ones named), the
hyper-parameters under ``{arch}.*`` and a byte-level BPE tokenizer of single characters (so
the engine can build a tokenizer from the file). Gemma norms are written as ``1 + w``, as the
converter writes them. GPT-NeoX's and Falcon's ``query_key_value`` are
regrouped from per-head (per KV group) rows to ``[q | k | v]`` as that converter does."""

from __future__ import annotations

import json
import os
import re

import gguf
import numpy as np
from safetensors.numpy import load_file


def _tokenizer(writer: gguf.GGUFWriter, vocab: int) -> None:
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(0xA1, 0x17F)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(alphabet[:vocab])
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab)
    writer.add_token_scores([0.0] * vocab)  # no merges: single characters
    writer.add_bos_token_id(1), writer.add_eos_token_id(2), writer.add_pad_token_id(0)


def _qkv_rows(tensor: np.ndarray, heads: int) -> np.ndarray:
    """``query_key_value`` rows per head ``[q_h | k_h | v_h]`` -> ``[q | k | v]``."""
    shape = tensor.shape
    per_head = tensor.reshape(heads, 3, shape[0] // heads // 3, *shape[1:])
    return np.ascontiguousarray(per_head.swapaxes(0, 1)).reshape(shape)


def _falcon_qkv_rows(tensor: np.ndarray, heads: int, kv: int) -> np.ndarray:
    """Falcon's ``query_key_value`` rows per KV group ``[q_g0 .. q_g(n-1) | k_g | v_g]`` (one
    group: multi-query; a group a head: per-head) -> ``[q | k | v]``, as the converter does."""
    groups = tensor.reshape(kv, heads // kv + 2, -1, *tensor.shape[1:])
    parts = (groups[:, :-2], groups[:, -2:-1], groups[:, -1:])
    return np.concatenate([p.reshape(-1, *tensor.shape[1:]) for p in parts])


def _kv_heads(config: dict, arch: str, heads: int) -> int:
    if arch != "falcon":
        return config.get("num_key_value_heads", heads)
    if config.get("new_decoder_architecture"):
        return config["num_kv_heads"]
    return 1 if config.get("multi_query", True) else heads


def _stack_experts(tensors: dict) -> dict:
    """HF's per-expert ``mlp.experts.<e>.<proj>.weight`` stacked into one
    ``mlp.experts.<proj>.weight`` [experts, ...] per layer and projection, as llama.cpp's
    converter writes ``ffn_*_exps``."""
    out, stacks = {}, {}
    for name, tensor in tensors.items():
        match = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+\.weight)", name)
        if match is None:
            out[name] = tensor
        else:
            stacks.setdefault(f"{match[1]}.{match[3]}", {})[int(match[2])] = tensor
    for name, experts in stacks.items():
        out[name] = np.stack([experts[e] for e in range(len(experts))])
    return out


def export_gguf(hf_dir: str, path: str, arch: str, quantize: tuple[str, ...] = (),
                metadata: dict | None = None, extra: dict | None = None) -> str:
    """``metadata``: ``{arch}``-relative keys -> (value, writer method name) added as they are
    (e.g. ``{"attention.layer_norm_epsilon": (1e-5, "add_float32")}``); ``quantize``: GGUF
    tensor names written Q8_0; ``extra``: GGUF name -> float32 array, written as well."""
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    layers = config.get("num_hidden_layers") or config["num_layers"]  # EXAONE's own field name
    names = gguf.get_tensor_name_map(arch_id, layers)
    heads = config["num_attention_heads"]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(layers), writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config.get("intermediate_size") or config["ffn_hidden_size"])
    kv = _kv_heads(config, arch, heads)
    writer.add_head_count(heads), writer.add_head_count_kv(kv)
    writer.add_vocab_size(config["vocab_size"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_key_length(head_dim), writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    for key, (value, method) in (metadata or {}).items():  # tokenizer.* keys as they are
        getattr(writer, method)(key if key.startswith("tokenizer.") else f"{arch}.{key}", value)
    _tokenizer(writer, config["vocab_size"])
    for name, tensor in _stack_experts(load_file(os.path.join(hf_dir, "model.safetensors"))).items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {name}")
        tensor = tensor.astype(np.float32)
        if arch == "gptneox" and ".query_key_value." in name:
            tensor = _qkv_rows(tensor, heads)
        if arch == "falcon" and ".query_key_value." in name:
            tensor = _falcon_qkv_rows(tensor, heads, kv)
        if name.endswith(".shared_expert_gate.weight"):
            tensor = tensor.reshape(-1)  # qwen2moe files hold a [hidden] vector (HF: [1, hidden])
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            tensor = tensor + 1  # the converter stores Gemma's norms as 1 + w
        if gguf_name in quantize:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(tensor, q8), raw_dtype=q8)
        else:
            writer.add_tensor(gguf_name, tensor)
    for gguf_name, array in (extra or {}).items():
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return path
