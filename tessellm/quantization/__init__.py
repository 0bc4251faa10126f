"""Quantized linear layers: schemes (how checkpoint tensors become packed weights) paired with a
backend's ``QuantOps`` (how packed weights are multiplied) by ``make_quant_method``.

    int8  weight-only, per-channel scales, quantized on load         (W8A16)
    fp8   e4m3 weights per channel + dynamic per-token activations   (W8A8)
          quantized on load, or compressed-tensors / fbgemm FP8 checkpoints
    fp8_block  e4m3 weights with a scale per 128x128 block (Qwen3-FP8, DeepSeek-V3), activations
          per token and group of 128 (W8A8) or dequantized slabs (W8A16, cpu)
    awq   4-bit AWQ (GEMM) checkpoints
    gptq  4-bit GPTQ checkpoints, with or without act-order
    gguf  a .gguf file's Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K blocks kept quantized in memory
    bitsandbytes  bnb 4-bit (NF4 / FP4, double quant) and 8-bit checkpoints, or NF4 on load

A backend plugin answers ``tessellm_quant_method`` with ``make_quant_method(spec, its_ops)``.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from tessellm.backends.spec import QuantSpec
from tessellm.quantization.base import QuantLinearMethod, QuantOps
from tessellm.quantization.config import SCHEMES, normalize_scheme, resolve_quant_spec

__all__ = ["SCHEMES", "QuantLinearMethod", "QuantOps", "make_quant_method", "missing_package",
           "normalize_scheme", "resolve_quant_spec"]

# Schemes whose method needs an optional package (not a dependency of tessellm): its import name.
SCHEME_PACKAGES = {"gguf": "gguf"}


def missing_package(scheme: str) -> Optional[str]:
    """The optional package ``scheme`` needs when it cannot be imported here, else None (the
    conformance suite skips such a scheme, naming the package; the engine refuses it)."""
    package = SCHEME_PACKAGES.get(scheme)
    if package is None:
        return None
    try:
        importlib.import_module(package)
    except ImportError:
        return package
    return None


def make_quant_method(spec: QuantSpec, ops: QuantOps,
                      fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> Optional[QuantLinearMethod]:
    """The method for ``spec`` running on ``ops``, or None when ``ops`` cannot run the scheme."""
    if spec.scheme not in ops.schemes:
        return None
    if spec.scheme == "int8":
        from tessellm.quantization.int8_fp8 import Int8Method

        return Int8Method(ops, spec.config)
    if spec.scheme == "fp8":
        from tessellm.quantization.int8_fp8 import Fp8Method

        return Fp8Method(ops, spec.config, fp8_dtype)
    if spec.scheme == "fp8_block":
        from tessellm.quantization.fp8_block_method import Fp8BlockMethod

        return Fp8BlockMethod(ops, spec.config, fp8_dtype)
    if spec.scheme in ("awq", "gptq"):
        from tessellm.quantization.int4 import Int4Method

        return Int4Method(ops, {"format": spec.scheme, **spec.config})
    if spec.scheme == "bitsandbytes":
        from tessellm.quantization.bnb_method import BnbMethod

        return BnbMethod(ops, spec.config)
    if spec.scheme == "gguf":
        try:
            from tessellm.quantization.gguf import GgufMethod
        except ImportError as exc:
            raise ValueError("quantization='gguf' needs the 'gguf' package (pip install "
                             "gguf).") from exc
        return GgufMethod(ops, spec.config)
    return None
