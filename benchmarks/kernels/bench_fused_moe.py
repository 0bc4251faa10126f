"""Micro-benchmark of the fused MoE kernel against the reference loop (GPU only).

    python3 benchmarks/kernels/bench_fused_moe.py [--json out.json]

One Qwen3-30B-A3B MoE layer (benchmarks/model-configs/qwen3-30b-a3b): 128 experts, top-8,
hidden 2048, expert intermediate 768, bf16, softmax routing renormalized. Tokens 1, 64, 4096.

Roofline per layer (H200: 4.25 TB/s, ~800 TFLOP/s bf16 dense):
  * bytes of one expert: 3 x 2048 x 768 x 2 B = 9.44 MB; all 128: 1.21 GB.
  * 1 token touches 8 experts: 75.5 MB -> >= 17.8 us.
  * 64 tokens (512 pairs) touch ~124 of 128 experts (1 - (120/128)^64 of each):
    ~1.17 GB -> >= 275 us; FLOPs 2 x 512 x 3 x 2048 x 768 = 4.8 GFLOP (6 us): memory bound.
  * 4096 tokens: all experts (1.21 GB, 285 us of reads); FLOPs 2 x 32768 x 3 x 2048 x 768
    = 309 GFLOP -> >= 386 us at 800 TFLOP/s: compute bound, floor ~0.39 ms.
The model has 48 such layers, so the whole-model MoE floor at 1 token is 0.85 ms of the ~1.6 ms
B1 floor (attention, embeddings and the LM head take the rest).
Each time is the median of ``triton.testing.do_bench`` (ms); the reference loop is
``backends/reference/moe.py`` (one masked gather and two GEMMs per touched expert).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

import triton  # noqa: E402

from tessellm.backends.reference.moe import fused_moe_reference  # noqa: E402
from tessellm.kernels.moe import fused_moe  # noqa: E402

E, K, H, I, DTYPE = 128, 8, 2048, 768, torch.bfloat16
BW, FLOPS = 4.25e12, 800e12


def floor_us(tokens: int) -> float:
    touched = E * (1 - (1 - K / E) ** tokens)
    read = touched * 3 * H * I * 2
    flop = 2 * tokens * K * 3 * H * I
    return max(read / BW, flop / FLOPS) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    w13 = (torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).to(DTYPE)
    w2 = (torch.randn(E, H, I, device=dev) / I ** 0.5).to(DTYPE)
    rows = []
    for tokens in (1, 64, 4096):
        x = torch.randn(tokens, H, device=dev).to(DTYPE)
        logits = torch.randn(tokens, E, device=dev)
        ref = fused_moe_reference(x, logits, w13, w2, K)
        out = fused_moe(x, logits, w13, w2, K)
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        t_kernel = triton.testing.do_bench(lambda: fused_moe(x, logits, w13, w2, K))
        t_ref = triton.testing.do_bench(lambda: fused_moe_reference(x, logits, w13, w2, K))
        row = dict(tokens=tokens, fused_ms=t_kernel, reference_ms=t_ref,
                   speedup=t_ref / t_kernel, floor_us=floor_us(tokens), max_rel_err=err)
        rows.append(row)
        print(f"tokens {tokens:5d}: fused {t_kernel * 1e3:8.1f} us  reference {t_ref * 1e3:9.1f} us"
              f"  ({t_ref / t_kernel:5.1f}x)  floor {row['floor_us']:6.1f} us  rel err {err:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows),
                                              indent=1))


if __name__ == "__main__":
    main()
