"""Tiny block-wise fp8 checkpoints written the way Qwen3-*-FP8 and DeepSeek-V3 are published.

Their layout (HF ``finegrained_fp8``; DeepSeek's ``inference/kernel.py``): config.json's
``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]}``; each quantized linear ``<p>.weight`` stored as
float8_e4m3fn ``[N, K]`` next to ``<p>.weight_scale_inv`` float32 ``[ceil(N/128),
ceil(K/128)]`` (multiplied, despite the name); embeddings, norms, the LM head and the MoE
router (``mlp.gate``) stay in the model dtype. Experts are quantized one tensor per expert and
projection under HF's names (``mlp.experts.<e>.gate_proj.weight`` ...).

``write_block_fp8`` writes that from a dense tiny model's safetensors, plus the *dequantized*
checkpoint (every quantized weight replaced by ``q * s`` in float32): the model the fp8 one
must serve, which HF transformers loads as an ordinary dense model.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file, save_file

from tessellm.quantization.fp8_block import dequantize_block, quantize_block_tensors

BLOCK = [128, 128]
CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": BLOCK}
_DENSE = re.compile(r"(embed_tokens|lm_head|norm|layernorm|\.mlp\.gate\.|shared_expert_gate)")


def quantized_names(state: dict) -> list[str]:
    """The 2-D linear weights a released block-fp8 checkpoint quantizes."""
    return [n for n, t in state.items()
            if n.endswith(".weight") and t.dim() == 2 and not _DENSE.search(n)]


def write_block_fp8(dense_dir: str, fp8_dir: str, dequant_dir: str, block=BLOCK,
                    quantization_config: dict | None = None) -> tuple[str, str]:
    state = load_file(os.path.join(dense_dir, "model.safetensors"))
    fp8, dense = dict(state), dict(state)
    for name in quantized_names(state):
        q, s = quantize_block_tensors(state[name], tuple(block))
        fp8[name] = q
        fp8[name.replace(".weight", ".weight_scale_inv")] = s
        dense[name] = dequantize_block(q, s, tuple(block))
    qc = dict(quantization_config or CONFIG, weight_block_size=list(block))
    _write(fp8_dir, fp8, dense_dir, qc)
    _write(dequant_dir, dense, dense_dir, None)
    return fp8_dir, dequant_dir


def _write(path: str, tensors: dict, config_from: str, quantization_config) -> None:
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    for extra in os.listdir(config_from):
        if extra.endswith(".json") and extra != "config.json" and "safetensors" not in extra:
            with open(os.path.join(config_from, extra)) as f, \
                    open(os.path.join(path, extra), "w") as g:
                g.write(f.read())
    with open(os.path.join(config_from, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
