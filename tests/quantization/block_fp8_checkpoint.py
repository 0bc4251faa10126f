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
# never quantized: embeddings (Nemotron-H's backbone.embeddings too), LM head, norms, MoE routers
# (Qwen/DeepSeek mlp.gate, Mixtral block_sparse_moe.gate, Granite's block_sparse_moe.router),
# Qwen2-MoE's shared-expert gate, Qwen3-Next's in_proj_ba (Qwen3-Next-80B-A3B-*-FP8 keep it bf16)
_DENSE = re.compile(r"(embed_tokens|embeddings|lm_head|norm|layernorm|\.gate\.weight$"
                    r"|shared_expert_gate|\.router\.|linear_attn\.in_proj_ba\.)")


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
    write_checkpoint(fp8_dir, fp8, dense_dir, qc)
    write_checkpoint(dequant_dir, dense, dense_dir, None)
    return fp8_dir, dequant_dir


def write_fp8_per_tensor(dense_dir: str, fp8_dir: str, dequant_dir: str) -> tuple[str, str]:
    """Per-tensor fp8 as Mixtral-8x7B-Instruct-v0.1-FP8 (AutoFP8) stores it: ``quant_method
    fp8``, ``activation_scheme static``, each linear (every expert projection too) an e4m3
    ``weight`` with a scalar ``weight_scale`` and ``input_scale``."""
    state = load_file(os.path.join(dense_dir, "model.safetensors"))
    fp8, dense = dict(state), dict(state)
    for name in quantized_names(state):
        w = state[name]
        scale = w.abs().amax().float() / 448
        q = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        fp8[name] = q
        fp8[name + "_scale"] = scale.reshape(())
        fp8[name.replace(".weight", ".input_scale")] = torch.tensor(0.05)
        dense[name] = q.float() * scale
    write_checkpoint(fp8_dir, fp8, dense_dir, {"quant_method": "fp8", "activation_scheme": "static"})
    write_checkpoint(dequant_dir, dense, dense_dir, None)
    return fp8_dir, dequant_dir


def checkpoint_maker(root, configs: dict, seed: int, per_tensor=()):
    """``make(arch)``: the ``(fp8 dir, dequantized dir)`` of a tiny random HF model of
    ``configs[arch]`` under ``root``, made once (``<arch>-dense`` beside them); block-wise fp8,
    or per-tensor for the archs in ``per_tensor``. A DeepSeek-V3 correction bias is made random
    (HF starts it at 0, where it would not matter)."""
    from transformers import AutoModelForCausalLM

    made = {}

    def make(arch: str) -> tuple[str, str]:
        if arch not in made:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(configs[arch], dtype=torch.float32)
            with torch.no_grad():
                for name, t in model.named_buffers():
                    if name.endswith("e_score_correction_bias"):
                        t.uniform_(-0.5, 0.5)
            dense = str(root / f"{arch}-dense")
            model.save_pretrained(dense)
            write = write_fp8_per_tensor if arch in per_tensor else write_block_fp8
            made[arch] = write(dense, str(root / f"{arch}-fp8"), str(root / f"{arch}-deq"))
        return made[arch]

    return make


def build(path: str, tp=None, backend: str = "cpu", quantization=None,
          load_format: str = "safetensors", device=torch.device("cpu"),
          expert_parallel: bool = False):
    """The model ``build_model`` makes of ``path`` (float32, on ``device``) for ``backend``."""
    from tessellm.backends.registry import BackendRegistry
    from tessellm.config import resolve_model
    from tessellm.loader.model_loader import build_model

    registry = BackendRegistry()
    model, _ = build_model(resolve_model(path), load_format, registry,
                           registry.backends[backend], torch.float32, device, 16,
                           tp=tp, quantization=quantization, expert_parallel=expert_parallel)
    return model


def generate(path: str, prompts, max_new: int, **engine_kwargs) -> list[list[int]]:
    """Greedy tokens of ``LLM(path)`` in float32 (EOS ignored)."""
    from tessellm import LLM, SamplingParams

    with LLM(path, dtype="float32", num_kv_blocks=64, **engine_kwargs) as llm:
        params = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def assert_serves_dequantized(fp8_dir: str, deq_dir: str, prompts, max_new: int) -> None:
    """The fp8 checkpoint's greedy tokens are the dequantized checkpoint's, served by tessellm
    and by HF transformers (float32)."""
    from tests.conftest import hf_greedy

    got = generate(fp8_dir, prompts, max_new)
    assert got == generate(deq_dir, prompts, max_new)
    assert got == hf_greedy(deq_dir, prompts, max_new)


def write_checkpoint(path: str, tensors: dict, config_from: str, quantization_config=None) -> str:
    """``tensors`` as one safetensors file with ``config_from``'s JSON files, the config's
    ``quantization_config`` replaced by ``quantization_config`` (dropped when None)."""
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
    return path
