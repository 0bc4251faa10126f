"""Micro-benchmark of the batched LoRA ops (tessellm/kernels/lora/) per decoder layer (GPU only).

    python3 benchmarks/kernels/bench_lora.py [--json out.json] [--budget-s 90]

Llama-3.1-8B shapes in bf16: hidden 4096, q 4096 / k 1024 / v 1024, o 4096, gate/up 14336,
down 14336 -> 4096; 16 adapter slots of rank 16 on every linear. Per layer the engine runs 4
shrinks (qkv stacked [S, 48, 4096], o [S, 16, 4096], gate/up stacked [S, 32, 4096], down
[S, 16, 14336]) and 4 expand_slices launches (q/k/v, o, gate/up, down). Batches: 1, 64 and
256 decode rows spread round-robin over the 16 adapters, a 2048-token prefill of one adapter and one of 16.

Bandwidth floor per op (H200, 4.25 TB/s measured copy bandwidth), adapters touched a = min(T, 16):
  shrink  T x K x 2 (x) + a x R' x K x 2 (A) + T x R' x 4 (out)
  expand  T x R x 4 (buf) + a x N x R x 2 (B) + 2 x T x N x 2 (out read + write)
e.g. T = 1 touches one adapter: its A and B of one layer are 16 x 2 B x (48 x 4096 + 16 x 4096 +
32 x 4096 + 16 x 14336 | 4096 + 2 x 1024 + 4096 + 2 x 14336 + 4096) ~ 2.6 MB -> 0.6 us per
layer, far below the ~2 us a launch takes in a graph: decode-sized batches are launch-bound (8
launches per layer, plus a memset per split-K shrink), prefill-sized ones read x (T x K x 2 B) and
read-modify-write the outputs (4 x T x N B) and approach the floor.
Times are GPU time per call from CUDA-graph replays (tessellm.testing.timing.graph_time_us),
rotating over 8 layers' weights so L2 cannot hold them; "base" is the layer's dense bf16
products (x @ W^T) for the same rows, the cost the LoRA part adds to; "split-K 1" is the shrink
without K splits (no memset), to check the split heuristic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from tessellm.kernels.lora import TritonLoRAOps, lora_shrink  # noqa: E402
from tessellm.testing.timing import graph_time_us  # noqa: E402

S, R, H, KV, I, DTYPE, BW, LAYERS = 16, 16, 4096, 1024, 14336, torch.bfloat16, 4.25e12, 8
# name -> (K, [output widths of the slices]) of each LoRA linear of a layer
PROJ = {"qkv": (H, [H, KV, KV]), "o": (H, [H]), "gate_up": (H, [I, I]), "down": (I, [H])}
BATCHES = [("decode", 1, S), ("decode", 64, S), ("decode", 256, S), ("prefill", 2048, 1),
           ("prefill", 2048, S)]


def _weights(dev):
    """Per projection, LAYERS copies of (stacked A, [B per slice], base W)."""
    out = {}
    for name, (k, ns) in PROJ.items():
        out[name] = [((torch.randn(S, len(ns) * R, k, device=dev) / k ** 0.5).to(DTYPE),
                      [(torch.randn(S, n, R, device=dev) / R ** 0.5).to(DTYPE) for n in ns],
                      torch.randn(sum(ns), k, device=dev).to(DTYPE) / k ** 0.5)
                     for _ in range(LAYERS)]
    return out


def _floor_us(t: int, k: int, ns: list, adapters: int) -> tuple[float, float]:
    shrink = t * k * 2 + adapters * len(ns) * R * k * 2 + t * len(ns) * R * 4
    expand = sum(t * R * 4 + adapters * n * R * 2 + 2 * t * n * 2 for n in ns)
    return shrink / BW * 1e6, expand / BW * 1e6


def _bench_batch(ops, weights, t: int, adapters: int, dev) -> dict:
    slots = (torch.arange(t, device=dev) % adapters).to(torch.int32)
    meta = ops.prepare(slots, S)
    scaling = torch.full((S,), 2.0, device=dev)
    row = {"tokens": t, "adapters": adapters, "prepare_us": graph_time_us(
        [lambda: ops.prepare(slots, S)], reps=20)[0]}
    totals = {"shrink_us": 0.0, "expand_us": 0.0, "base_us": 0.0, "floor_us": 0.0}
    for name, (k, ns) in PROJ.items():
        x = torch.randn(t, k, device=dev).to(DTYPE)
        y = torch.zeros(t, sum(ns), device=dev, dtype=DTYPE)
        buf = torch.empty(t, len(ns) * R, device=dev)
        shrinks = [lambda a=a: ops.shrink(x, a, meta, buf) for a, _, _ in weights[name]]

        offsets = [sum(ns[:i]) for i in range(len(ns))]
        expands = [lambda bs=bs: ops.expand_slices(buf, bs, meta, scaling, y, offsets)
                   for _, bs, _ in weights[name]]
        base = [lambda w=w: torch.matmul(x, w.t()) for _, _, w in weights[name]]
        whole_k = [lambda a=a: lora_shrink(x, a, meta, buf, split_k=1) for a, _, _ in weights[name]]
        s_us, e_us = graph_time_us(shrinks, reps=40)[0], graph_time_us(expands, reps=40)[0]
        s1_us = graph_time_us(whole_k, reps=40)[0]
        b_us = graph_time_us(base, reps=40)[0]
        fs, fe = _floor_us(t, k, ns, min(t, adapters))
        row[name] = {"shrink_us": round(s_us, 2), "shrink_split1_us": round(s1_us, 2),
                     "expand_us": round(e_us, 2),
                     "floor_shrink_us": round(fs, 2), "floor_expand_us": round(fe, 2),
                     "base_gemm_us": round(b_us, 2)}
        for key, v in (("shrink_us", s_us), ("expand_us", e_us), ("base_us", b_us),
                       ("floor_us", fs + fe)):
            totals[key] += v
    row["layer"] = {k: round(v, 2) for k, v in totals.items()}
    row["layer"]["lora_over_base"] = round((totals["shrink_us"] + totals["expand_us"])
                                           / totals["base_us"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--budget-s", type=float, default=90.0, help="stop starting new batches after this")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    ops, weights, start, rows = TritonLoRAOps(), _weights(dev), time.time(), []
    for kind, t, adapters in BATCHES:
        if time.time() - start > args.budget_s:
            print(f"time box reached: skipping {kind} T={t}")
            continue
        row = _bench_batch(ops, weights, t, adapters, dev)
        row["kind"] = kind
        rows.append(row)
        layer = row["layer"]
        print(f"{kind:8s} T={t:5d} adapters={adapters:2d}  per layer: shrink {layer['shrink_us']:7.1f} us"
              f"  expand {layer['expand_us']:7.1f} us  floor {layer['floor_us']:6.2f} us  base GEMMs "
              f"{layer['base_us']:7.1f} us  LoRA/base {layer['lora_over_base']:.2f}  prepare "
              f"{row['prepare_us']:.1f} us")
        for name in PROJ:
            p = row[name]
            print(f"    {name:8s} shrink {p['shrink_us']:7.1f} (split-K 1: {p['shrink_split1_us']:6.1f}, "
                  f"floor {p['floor_shrink_us']:6.2f})  "
                  f"expand {p['expand_us']:7.1f} (floor {p['floor_expand_us']:6.2f})  base "
                  f"{p['base_gemm_us']:7.1f} us")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
