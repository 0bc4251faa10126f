"""Micro-benchmark of MoE experts with per-token LoRA (``kernels/lora/moe.py``) against the
same experts without (``kernels/moe/fused_moe.fused_moe_triton``), one layer (GPU only).

    python3 benchmarks/kernels/bench_moe_lora.py

Qwen3-30B-A3B's layer in bf16: hidden 2048, 128 experts of intermediate 768, top-8; 4 adapter
slots of rank 16 on every expert's gate/up/down; T = 1, 16, 64, 256 decode rows spread over
the slots and a 2048-token prefill of one adapter. GPU time per call from CUDA-graph replays
(``tessellm.testing.timing.graph_time_us``); the graphs also check that the LoRA path captures.
Prints one line per batch: ``MOELORA T=.. base .. us lora .. us (x..)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from tessellm.backends.reference.moe import route  # noqa: E402
from tessellm.backends.spec import ExpertLoRA  # noqa: E402
from tessellm.kernels.lora.moe import fused_experts_lora_triton  # noqa: E402
from tessellm.kernels.moe.fused_moe import fused_moe_triton  # noqa: E402
from tessellm.testing.timing import graph_time_us  # noqa: E402

H, I, E, K, S, R, DT = 2048, 768, 128, 8, 4, 16, torch.bfloat16


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *shape, s=0.02: (torch.randn(*shape, generator=g, device=dev) * s).to(DT)  # noqa: E731
    w13, w2 = rnd(E, 2 * I, H), rnd(E, H, I)
    lora = ExpertLoRA(rnd(S, E, 2 * R, H), rnd(S, E, 2 * I, R), rnd(S, E, R, I), rnd(S, E, H, R),
                      torch.full((S,), 2.0, device=dev))
    for t, spread in ((1, S), (16, S), (64, S), (256, S), (2048, 1)):
        x = rnd(t, H, s=1.0)
        weights, ids = route(torch.randn(t, E, generator=g, device=dev), K)
        ids = ids.to(torch.int32)
        slots = (torch.arange(t, device=dev, dtype=torch.int32) % spread)
        base_us = graph_time_us([lambda: fused_moe_triton(x, weights, ids, w13, w2)], 4)[0]
        lora_us = graph_time_us([lambda: fused_experts_lora_triton(
            x, weights, ids, w13, w2, slots, lora)], 4)[0]
        print(f"MOELORA T={t} adapters={min(spread, t)} base {base_us:.1f} us lora "
              f"{lora_us:.1f} us (x{lora_us / base_us:.2f})", flush=True)


if __name__ == "__main__":
    main()
