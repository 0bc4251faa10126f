"""Tiny bitsandbytes checkpoints made by the real library, the way the hub's ``*-bnb-4bit`` models
are: HF transformers' ``BitsAndBytesConfig`` quantizes a dense tiny model on the CPU and
``save_pretrained`` writes it (``weight`` uint8 with ``weight.absmax``, ``weight.quant_map``,
``weight.quant_state.bitsandbytes__nf4|fp4`` and, with double quantization,
``weight.nested_absmax`` / ``weight.nested_quant_map``; 8-bit: ``weight`` int8 with ``SCB``).

``write_bnb`` also writes the *dequantized* checkpoint (each quantized weight replaced by
``bitsandbytes.functional.dequantize_4bit`` of it, or ``q * SCB / 127``, float32): the model the
bnb one must serve, which HF transformers loads as an ordinary dense model. Needs the
``bitsandbytes`` package (the ``[test]`` extra)."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from tests.quantization.block_fp8_checkpoint import write_checkpoint


def write_bnb(dense_dir: str, bnb_dir: str, deq_dir: str, bits: int = 4,
              quant_type: str = "nf4", double_quant: bool = False,
              skip_modules: str = "") -> tuple[str, str]:
    """``skip_modules``: comma-separated module names left in float (``llm_int8_skip_modules``,
    as unsloth's "dynamic" quants leave some layers)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": skip_modules.split(",") + ["lm_head"]} if skip_modules else {}
    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                    bnb_4bit_use_double_quant=double_quant,
                                    bnb_4bit_compute_dtype=torch.float32, **skip)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, **skip)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config,
                                                 device_map="cpu", dtype=torch.float32)
    model.save_pretrained(bnb_dir)
    write_checkpoint(deq_dir, dequantized(os.path.join(bnb_dir, "model.safetensors")), dense_dir)
    return bnb_dir, deq_dir


def dequantized(path: str) -> dict:
    """A bnb checkpoint file's tensors with every quantized weight dequantized by bitsandbytes
    (float32) and its quantization state dropped."""
    import bitsandbytes.functional as F

    state = load_file(path)
    out = {}
    for name, t in state.items():
        prefix, _, attr = name.rpartition(".")
        if ".weight." in name or attr in ("SCB", "weight_format"):
            continue  # a quantization state tensor
        parts = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        if t.dtype == torch.uint8 and parts:
            qs = F.QuantState.from_dict(parts, device=torch.device("cpu"))
            out[name] = F.dequantize_4bit(t, qs).float()
        elif t.dtype == torch.int8:
            out[name] = t.float() * state[f"{prefix}.SCB"].float()[:, None] / 127
        else:
            out[name] = t
    return out


def bnb_maker(root, config_of, seed: int):
    """``make(arch, **bnb)``: the ``(bnb dir, dequantized dir)`` of a tiny random HF model of
    config ``config_of(arch)`` under ``root`` (made once per arch and settings; ``bnb``:
    ``write_bnb``'s ``bits``, ``quant_type``, ``double_quant``)."""
    from transformers import AutoModelForCausalLM

    made: dict = {}

    def make(arch: str, **bnb) -> tuple[str, str]:
        dense = str(root / f"{arch}-dense")
        if not os.path.isdir(dense):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config_of(arch), dtype=torch.float32)
            model.save_pretrained(dense)
        key = (arch, tuple(sorted(bnb.items())))
        if key not in made:
            tag = "-".join(f"{k}{v}" for k, v in sorted(bnb.items()))
            made[key] = write_bnb(dense, str(root / f"{arch}-bnb-{tag}"),
                                  str(root / f"{arch}-deq-{tag}"), **bnb)
        return made[key]

    return make


def write_bnb_linears(dense_dir: str, bnb_dir: str, deq_dir: str, quant_type: str = "nf4",
                      double_quant: bool = True, skip: tuple = ()) -> tuple[str, str]:
    """As ``write_bnb``, each 2-D linear weight (every MoE expert projection and router too,
    as transformers 4's bnb quantization of ``nn.Linear`` modules saves them; not embeddings,
    ``lm_head`` or norms) quantized by ``bitsandbytes.functional.quantize_4bit`` on the CPU and
    saved with its state under the checkpoint's names: for models whose experts transformers
    5 keeps as 3-D parameters, which its bnb integration leaves unquantized. ``skip``: module
    names (dotted components, as ``llm_int8_skip_modules``, where they are written) left float:
    ``("gate",)`` the routers."""
    import bitsandbytes.functional as F

    state = load_file(os.path.join(dense_dir, "model.safetensors"))
    out = {}
    for name, t in state.items():
        skipped = any(f".{m}." in f".{name}" for m in skip)
        if t.dim() != 2 or skipped or "embed" in name or "lm_head" in name or "norm" in name:
            out[name] = t
            continue
        q, qs = F.quantize_4bit(t.float().contiguous(), blocksize=64, quant_type=quant_type,
                                compress_statistics=double_quant)
        out[name] = q
        out.update({f"{name}.{k}": v for k, v in qs.as_dict(packed=True).items()})
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
          "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
          "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
          "llm_int8_skip_modules": list(skip) + ["lm_head"]}
    write_checkpoint(bnb_dir, out, dense_dir, qc)
    write_checkpoint(deq_dir, dequantized(os.path.join(bnb_dir, "model.safetensors")), dense_dir)
    return bnb_dir, deq_dir
