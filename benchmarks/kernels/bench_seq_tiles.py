"""The sequential prefill kernels' launch settings on a GPU: the sequential Mamba scan
(``chunk_scan.sequential_chunk_scan``: steps whose longest sequence is under
``SSD_MIN_TOKENS``, e.g. a cached prefix's rest) and the gated delta chunk kernel
(``gated_delta.chunk``: Qwen3-Next's every prefill). Each keeps its state block in registers,
and compiled for sm90 every tile tried spills (ptxas: 2-10 KB a thread at 255 registers), so
the block of head / value dims a program (``sequential_config`` / ``chunk_config``) and the
warps are timed here against the default, one layer's worth (CUDA events around back-to-back
eager calls), bfloat16 inputs and states as the engine keeps them.

Shapes: Mamba2-2.7B (80 heads x 64, state 128), Granite 4.0-H small (128 x 64, 128),
Qwen3-Next-80B's gated DeltaNet (16 key heads, 32 value heads, 128 x 128). One prompt of 32 /
128 / 512 / 2048 tokens, and 4 prompts of 512. Per case a row of ms per setting (``*`` the
default), then per shape the setting with the least total time over the cases and its ratio
to the default's at each case; every setting's outputs and states are checked against the
default's (exit 1 past 1e-2 relative: a tile that computes something else).

    python benchmarks/kernels/bench_seq_tiles.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tessellm.core.mamba_state import make_batch
from tessellm.kernels.gated_delta import chunk as delta_chunk
from tessellm.kernels.mamba import chunk_scan

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_timing
from gpu_timing import events_ms  # noqa: E402

SCANS = {"mamba2-2.7b": dict(H=80, P=64, G=1, N=128),
         "granite-4.0-h-small": dict(H=128, P=64, G=1, N=128)}
DELTAS = {"qwen3-next-80b": dict(Hk=16, Hv=32, K=128, V=128)}
CASES = [[32], [128], [512], [2048], [512] * 4]
SCAN_SETTINGS = [(bp, w) for bp in (16, 32, 64) for w in (2, 4, 8)]
DELTA_SETTINGS = [(bv, w) for bv in (16, 32, 64) for w in (4, 8)]
DTYPE = torch.bfloat16
TOL = 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def sweep(name, module, hook, default, settings, make, cases) -> float:
    """Time ``make(lengths)``'s call under each setting (``module.hook`` replaced); print the
    rows; returns the largest difference from the default setting's results."""
    original = getattr(module, hook)
    worst, totals, rows = 0.0, {s: 0.0 for s in settings}, []
    print(f"{name}: settings (block, warps) " + " ".join(
        f"{str(s) + ('*' if s == default else ''):>10s}" for s in settings), flush=True)
    try:
        for lengths in cases:
            call, outputs = make(lengths)
            setattr(module, hook, lambda *_: default)
            want = [t.clone() for t in outputs(call())]
            times = {}
            for s in settings:
                setattr(module, hook, lambda *_, s=s: s)
                got = outputs(call())
                worst = max(worst, *(_rel(a, b) for a, b in zip(got, want)))
                times[s] = events_ms(call, 3 if sum(lengths) >= 2048 else 10)
                totals[s] += times[s]
            label = f"{sum(lengths)}" if len(lengths) == 1 else f"{len(lengths)}x{lengths[0]}"
            rows.append((label, times))
            print(f"  {label:>8s} ms " + " ".join(f"{times[s]:10.3f}" for s in settings),
                  flush=True)
    finally:
        setattr(module, hook, original)
    best = min(settings, key=lambda s: totals[s])
    ratios = ", ".join(f"{label} {t[default] / t[best]:.2f}x" for label, t in rows)
    print(f"  best {best} (default {default}): default / best {ratios}", flush=True)
    return worst


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="128 and 2048 tokens only")
    args = ap.parse_args()
    cases = [[128], [2048]] if args.quick else CASES
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=g, device=dev) * scale + shift).to(DTYPE)

    worst = 0.0
    for name, s in SCANS.items():
        H, P, G, N = s["H"], s["P"], s["G"], s["N"]

        def make(lengths, H=H, P=P, G=G, N=N):
            T, seqs = sum(lengths), len(lengths)
            x, dt, B, C = rnd(T, H, P), rnd(T, H, shift=-2.0), rnd(T, G, N), rnd(T, G, N)
            A = -torch.rand(H, generator=g, device=dev) * 4 - 0.5
            D, dt_bias = rnd(H), rnd(H, scale=0.5)
            init = rnd(seqs + 1, H, P, N, scale=0.3)
            batch = make_batch(lengths, list(range(1, seqs + 1)), dev)
            batch = batch.prefills or batch
            state = init.clone()

            def call():
                state.copy_(init)
                return chunk_scan.sequential_chunk_scan(x, dt, A, B, C, D, dt_bias, state, batch)
            return call, lambda y: (y, state)
        worst = max(worst, sweep(f"sequential scan {name}", chunk_scan, "sequential_config",
                                 chunk_scan.sequential_config(P, N), SCAN_SETTINGS, make, cases))
    for name, s in DELTAS.items():
        Hk, Hv, K, V = s["Hk"], s["Hv"], s["K"], s["V"]

        def make(lengths, Hk=Hk, Hv=Hv, K=K, V=V):
            T, seqs = sum(lengths), len(lengths)
            q, k, v = rnd(T, Hk, K), rnd(T, Hk, K), rnd(T, Hv, V)
            gate = -torch.rand(T, Hv, generator=g, device=dev) * 0.5
            beta = torch.rand(T, Hv, generator=g, device=dev).to(DTYPE)
            init = rnd(seqs + 1, Hv, K, V, scale=0.1)
            batch = make_batch(lengths, list(range(1, seqs + 1)), dev)
            batch = batch.prefills or batch
            state = init.clone()

            def call():
                state.copy_(init)
                return delta_chunk.gated_delta_chunk(q, k, v, gate, beta, state, batch, K ** -0.5)
            return call, lambda o: (o, state)
        worst = max(worst, sweep(f"gated delta chunk {name}", delta_chunk, "chunk_config",
                                 delta_chunk.chunk_config(K, V), DELTA_SETTINGS, make, cases))
    print(f"largest relative difference from the default setting {worst:.2e} "
          f"(tolerance {TOL:.0e})")
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
