"""Weight memory per scheme for Llama-3.1-8B shapes, and the KV tokens that leaves on a GPU.

Builds the real model with ONE decoder layer on the CPU (random weights, each scheme's own
packed format), measures its bytes, and extrapolates: ``total = rest + 32 x one layer``, where
``rest`` is the embeddings, ``lm_head`` and final norm (bf16 in every scheme). GGUF rows use the
in-memory bits per weight of each block type (``tessellm/quantization/gguf.py``).

KV tokens: ``(capacity * 0.9 - weights - reserve) / bytes per token``, bytes per token =
2 x 32 layers x 8 KV heads x 128 x element size; ``reserve`` (activations, graphs, workspace)
is an assumption printed with the table (the GPU run measures the real count).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LLAMA_8B = os.path.join(ROOT, "benchmarks", "model-configs", "llama-3.1-8b")
GPUS = {"H100 80GB": 79.6e9, "H200 141GB": 139.8e9}  # bytes torch reports as total


def layer_bytes(scheme: str) -> tuple[int, int]:
    """(bytes of everything but the layers, bytes of one decoder layer) for ``scheme``."""
    import torch

    from tessellm.backends.registry import BackendRegistry
    from tessellm.config import resolve_model
    from tessellm.loader.model_loader import build_model
    from tessellm.quantization.loading import weight_bytes

    source = resolve_model(LLAMA_8B)
    config = _one_layer(source.hf_config)
    if scheme == "awq":  # as if the checkpoint were an AWQ one (group 128)
        config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 128,
                                      "zero_point": True, "version": "gemm"}
        scheme = None
    source = dataclasses.replace(source, hf_config=config)
    registry = BackendRegistry()
    backend = registry.backends["cuda" if scheme is None else "cpu"]
    model, _ = build_model(source, "dummy", registry, backend, torch.bfloat16,
                           torch.device("cpu"), 16, quantization=None if scheme == "bf16" else scheme)
    total = weight_bytes(model)
    own = list(model.layers[0].named_parameters()) + list(model.layers[0].named_buffers())
    layer = sum(t.nbytes for n, t in own if "rotary" not in n)  # the rotary cache is shared
    return total - layer, layer


def _one_layer(config):
    import copy

    config = copy.deepcopy(config)
    config.num_hidden_layers = 1
    return config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reserve-gb", type=float, default=6.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    rows = {}
    rest, bf16_layer = layer_bytes("bf16")
    linear_params = 4096 * (6144 + 4096 + 28672) + 14336 * 4096
    norms = 2 * 4096 * 2
    for scheme in ("bf16", "int8", "fp8", "awq"):
        r, layer = (rest, bf16_layer) if scheme == "bf16" else layer_bytes(scheme)
        rows[scheme] = r + 32 * layer
    for name, bits in (("gguf Q8_0", 8.5), ("gguf Q4_K", 6.0), ("gguf Q4_1", 5.0), ("gguf Q4_0", 4.5)):
        rows[name] = rest + 32 * (int(linear_params * bits / 8) + norms)
    kv_token = {"bf16": 2 * 32 * 8 * 128 * 2, "fp8": 2 * 32 * 8 * 128}
    table = []
    for scheme, nbytes in rows.items():
        row = {"scheme": scheme, "weight_gb": round(nbytes / 1e9, 2),
               "vs_bf16": round(nbytes / rows["bf16"], 3)}
        for gpu, cap in GPUS.items():
            free = cap * 0.9 - nbytes - args.reserve_gb * 1e9
            for kv, per in kv_token.items():
                row[f"{gpu} kv {kv} tokens"] = int(free // per)
        table.append(row)
    print(f"Llama-3.1-8B shapes; reserve {args.reserve_gb} GB; gpu_memory_utilization 0.9\n")
    cols = list(table[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in table:
        print("| " + " | ".join(f"{row[c]:,}" if isinstance(row[c], int) else str(row[c])
                                for c in cols) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"reserve_gb": args.reserve_gb, "rows": table}, f, indent=2)


if __name__ == "__main__":
    main()
