"""The Mamba2 prefill scan (``FusedOps.mamba_chunk_scan`` of the Triton backends) on a GPU: the
parallel SSD kernels (``kernels/mamba/ssd.py``, what ``mamba_chunk_scan`` runs) against the
sequential kernel they replace (``chunk_scan.sequential_chunk_scan``: one program per sequence
and head walking its tokens), one layer's worth.

Shapes: Mamba2-2.7B (80 heads x 64, one group, state 128) and Granite 4.0-H small (128 heads x
64, one group, state 128); bfloat16 inputs and states as the engine keeps them; one prompt of
512 / 1500 / 3000 / 8000 tokens, and 4 prompts of 750 (a mixed prefill step). Per case: the
milliseconds per call (CUDA events around back-to-back eager calls: launches in, as a prefill
step runs them), the speed-up, and the largest difference between the two kernels' outputs and
final states relative to the largest value (exit 1 past 2e-2: bf16 rounding of ``y``).

``--lengths 16 64 256 ...``: one prompt of each length instead (the short-chunk sweep: cached
prefix steps, decode-sized mixed steps); the ``auto ms`` column is ``mamba_chunk_scan`` with
``TESSELLM_SSD_SCAN=1`` (the SSD kernels from ``chunk_scan.SSD_MIN_TOKENS`` tokens, the
sequential kernel below), which should be the faster of the two at every length, and a
``crossover`` line per model names the shortest length from which the SSD kernels won at every
longer one (what ``SSD_MIN_TOKENS`` should be).

    python benchmarks/kernels/bench_ssd_scan.py [--quick | --lengths 16 64 256 1024 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from tessellm.core.mamba_state import make_batch
from tessellm.kernels.mamba import ssd
from tessellm.kernels.mamba import chunk_scan
from tessellm.kernels.mamba.chunk_scan import mamba_chunk_scan, sequential_chunk_scan

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_timing
from gpu_timing import events_ms  # noqa: E402

SHAPES = {"mamba2-2.7b": dict(H=80, P=64, G=1, N=128),
          "granite-4.0-h-small": dict(H=128, P=64, G=1, N=128)}
CASES = [[512], [1500], [3000], [8000], [750] * 4]
DTYPE = torch.bfloat16
TOL = 2e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="3000 tokens only")
    ap.add_argument("--lengths", type=int, nargs="+", help="one prompt of each length")
    args = ap.parse_args()
    os.environ["TESSELLM_SSD_SCAN"] = "1"  # the auto column: mamba_chunk_scan's own choice
    cases = [[n] for n in args.lengths] if args.lengths else [[3000]] if args.quick else CASES
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    worst = 0.0
    print(f"{'model':22s} {'tokens':>12s} {'seq ms':>9s} {'ssd ms':>9s} {'x':>7s} "
          f"{'auto ms':>9s} {'y diff':>9s} {'state diff':>10s}")
    for name, s in SHAPES.items():
        H, P, G, N = s["H"], s["P"], s["G"], s["N"]
        wins = []  # (tokens, ssd faster) of the single-prompt cases
        for lengths in cases:
            T, seqs = sum(lengths), len(lengths)

            def rnd(*size, scale=1.0, shift=0.0):
                return (torch.randn(*size, generator=g, device=dev) * scale + shift).to(DTYPE)

            x, dt = rnd(T, H, P), rnd(T, H, shift=-2.0)
            B, C = rnd(T, G, N), rnd(T, G, N)
            A = -torch.rand(H, generator=g, device=dev) * 4 - 0.5
            D, dt_bias = rnd(H), rnd(H, scale=0.5)
            init = rnd(seqs + 1, H, P, N, scale=0.3)
            batch = make_batch(lengths, list(range(1, seqs + 1)), dev)
            batch = batch.prefills or batch
            s_seq, s_ssd = init.clone(), init.clone()
            y_seq = sequential_chunk_scan(x, dt, A, B, C, D, dt_bias, s_seq, batch)
            y_ssd = ssd.ssd_chunk_scan(x, dt, A, B, C, D, dt_bias, s_ssd, batch)
            dy, ds = _rel(y_ssd, y_seq), _rel(s_ssd, s_seq)
            worst = max(worst, dy, ds)
            work = init.clone()
            t_seq = events_ms(lambda: sequential_chunk_scan(x, dt, A, B, C, D, dt_bias, work, batch),
                        3 if T >= 3000 else 10)
            t_ssd = events_ms(lambda: ssd.ssd_chunk_scan(x, dt, A, B, C, D, dt_bias, work, batch), 50)
            t_auto = events_ms(lambda: mamba_chunk_scan(x, dt, A, B, C, D, dt_bias, work, batch,
                                                        256), 3 if T >= 3000 else 20)
            label = f"{T}" if seqs == 1 else f"{seqs}x{lengths[0]}"
            print(f"{name:22s} {label:>12s} {t_seq:9.3f} {t_ssd:9.3f} {t_seq / t_ssd:7.1f} "
                  f"{t_auto:9.3f} {dy:9.2e} {ds:10.2e}", flush=True)
            if seqs == 1:
                wins.append((T, t_ssd < t_seq))
        if len(wins) > 1:
            wins.sort()
            first = next((n for i, (n, _) in enumerate(wins) if all(w for _, w in wins[i:])), None)
            print(f"crossover {name}: ssd wins from {first} tokens on "
                  f"(SSD_MIN_TOKENS is {chunk_scan.SSD_MIN_TOKENS})", flush=True)
    print(f"largest relative difference {worst:.2e} (tolerance {TOL:.0e})")
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
