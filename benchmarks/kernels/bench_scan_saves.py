"""The cached-prefix step's Mamba ops with and without their in-step saves, one layer's worth on
a GPU (mscan, session 20: Mamba2's ``hybrid_host_step`` step went 12.0 -> 18.6 ms on an H100
once the sequential scan kept its saves in one pass (0d197dc) and the conv in its state
launch (42f1974)). The step of ``hybrid_host_step.py``: one sequence of 48 tokens from its
slot, the state after its first 32 saved (a block boundary inside the step).

Per shape and op, three ways to serve the save, each as GPU microseconds a call (CUDA-graph
replays: host launch costs out) and eager wall microseconds a call (back to back: host costs
in, the GPU's when they are longer):

* ``none``      no save (the op alone; the floor)
* ``inpass``    the op keeps it (``snapshots=``: the scan's one pass with ``SAVES``, the conv's
                state launch; what the engine runs on cuda now)
* ``pieces``    the old way: the scan once per piece (``run_with_saves``: 2 launches + a copy),
                the conv's window copied first (``save_conv_states``) then the plain conv

Shapes (bfloat16 as the engine keeps them): ``bench-mamba2`` (``recurrent_state_graphs.py``'s
Mamba2: 24 heads of 64, state 128, conv 1792 channels), ``bench-granite4h`` (64 heads, conv
4352), ``mamba2-2.7b`` (80 heads, conv 5376). Outputs and states of ``inpass`` and ``pieces``
are checked against each other (exit 1 past 1e-2 relative).

    python benchmarks/kernels/bench_scan_saves.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_timing

from gpu_timing import eager_us, gtime  # noqa: E402

from tessellm.core.mamba_state import make_batch  # noqa: E402
from tessellm.kernels.mamba import chunk_scan, conv1d  # noqa: E402
from tessellm.kernels.recurrent_pieces import run_with_saves, save_conv_states  # noqa: E402

SHAPES = {"bench-mamba2": dict(H=24, P=64, N=128, G=1),
          "bench-granite4h": dict(H=64, P=64, N=128, G=1),
          "mamba2-2.7b": dict(H=80, P=64, N=128, G=1)}
LENGTH, SAVE_AT, K = 48, 32, 4
DTYPE = torch.bfloat16
TOL = 1e-2


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def main() -> int:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=g, device=dev) * scale + shift).to(DTYPE)

    worst = 0.0
    print(f"one sequence of {LENGTH} tokens, a save after {SAVE_AT}: us a call, "
          "GPU (graph replays) / eager wall", flush=True)
    for name, s in SHAPES.items():
        H, P, N, G = s["H"], s["P"], s["N"], s["G"]
        T, Cc = LENGTH, H * P + 2 * G * N
        x, dt, B, C = rnd(T, H, P), rnd(T, H, shift=-2.0), rnd(T, G, N), rnd(T, G, N)
        A = -torch.rand(H, generator=g, device=dev) * 4 - 0.5
        D, dt_bias = rnd(H), rnd(H, scale=0.5)
        init = rnd(2, H, P, N, scale=0.3)
        xc, w, bias = rnd(T, Cc), rnd(Cc, K, scale=0.5), rnd(Cc)
        cinit = rnd(2, Cc, K - 1)

        def batch(saves):
            b = make_batch([LENGTH], [1], dev, saves=[(0, SAVE_AT, 1)] if saves else None)
            return b.prefills or b

        plain, saving = batch(False), batch(True)
        state, pool = init.clone(), torch.zeros_like(init)
        cstate, cpool = cinit.clone(), torch.zeros_like(cinit)

        def scan(b, **kw):
            state.copy_(init)
            return chunk_scan.sequential_chunk_scan(x, dt, A, B, C, D, dt_bias, state, b, **kw)

        def scan_pieces():
            state.copy_(init)
            return run_with_saves(
                lambda t, b: chunk_scan.sequential_chunk_scan(t[0], t[1], A, t[2], t[3], D,
                                                              dt_bias, state, b),
                [x, dt, B, C], saving, [(state, pool)])

        def conv(b, **kw):
            cstate.copy_(cinit)
            return conv1d.mamba_conv1d(xc, w, bias, cstate, b, "silu", **kw)

        def conv_pieces():
            cstate.copy_(cinit)
            save_conv_states(xc, cstate, saving, cpool)
            return conv1d.mamba_conv1d(xc, w, bias, cstate, plain, "silu")

        ways = {"scan": {"none": lambda: scan(plain),
                         "inpass": lambda: scan(saving, snapshots=pool),
                         "pieces": scan_pieces},
                "conv": {"none": lambda: conv(plain),
                         "inpass": lambda: conv(saving, snapshots=cpool),
                         "pieces": conv_pieces}}
        for op, calls in ways.items():
            keep = (state, pool) if op == "scan" else (cstate, cpool)
            got = {}
            for way in ("inpass", "pieces"):
                keep[1].zero_()
                out = calls[way]()
                got[way] = [out.clone(), keep[0].clone(), keep[1].clone()]
            worst = max(worst, *(_rel(a, b) for a, b in zip(got["inpass"], got["pieces"])))
            row = []
            for way, fn in calls.items():
                row.append(f"{way} {gtime(fn, 20):7.1f} / {eager_us(fn, 50):7.1f}")
            print(f"{name:16s} {op:4s} " + " | ".join(row), flush=True)
    print(f"largest relative difference inpass vs pieces {worst:.2e} (tolerance {TOL:.0e})")
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
