"""The verify ops of speculative decoding on the hybrid models, fused (``kernels/mamba/verify.py``,
``kernels/gated_delta/verify.py``: one launch per op) against the composed path they replace
(``backends/reference/recurrent_verify.py``: the one-token Triton kernels run once per token
position, a state copy before each; the conv in pure torch), one layer's worth, on a GPU.

Shapes: a Granite 4.0-H small Mamba2 mixer (128 heads x 64, one group, state 128, conv width 4:
the conv over 8448 channels, then the SSM) and a Qwen3-Next-80B gated DeltaNet layer (16 key /
32 value heads of 128, the conv over 8192 channels, then the delta rule); bfloat16 states as the
engine keeps them; batches of 1, 16 and 64 sequences of k + 1 tokens, k = 3 and 5. Per case:
the largest difference between the two paths' outputs and states (relative to the largest
value; exit 1 past 5e-2), the GPU time per layer from CUDA-graph replays
(``testing/timing.graph_time_us``: launch gaps out) and the eager wall time per layer (what a
verify step, which runs eagerly today on these models, pays: launches in).

    python benchmarks/kernels/bench_recurrent_verify.py [--quick]     (repo root, on a GPU)
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

from tessellm.backends.reference import recurrent_verify as composed
from tessellm.core.mamba_state import make_batch
from tessellm.kernels.gated_delta import gated_delta_step, gated_delta_verify
from tessellm.kernels.mamba import (mamba_conv1d_verify, mamba_state_update,
                                    mamba_state_update_verify)
from tessellm.testing.timing import graph_time_us

DTYPE = torch.bfloat16
WIDTH = 4  # conv width of both families
GRANITE = dict(H=128, P=64, G=1, N=128)  # Granite 4.0-H small's mixer
QWEN3_NEXT = dict(HK=16, HV=32, K=128, V=128)  # Qwen3-Next-80B-A3B's gated DeltaNet
TOL = 5e-2  # bf16: the composed conv rounds each product to bf16, the kernel sums in fp32
K_SCALE = QWEN3_NEXT["K"] ** -0.5


def _verify_batch(seqs: int, length: int, device):
    """``seqs`` sequences of ``length`` tokens in slots 0..seqs-1, their spares after them."""
    token_slots = []
    for s in range(seqs):
        spare = seqs + 1 + s * (length - 1)
        token_slots += list(range(spare, spare + length - 1)) + [s]
    total = seqs + 1 + seqs * (length - 1)
    return make_batch([length] * seqs, list(range(seqs)), device, seqs, token_slots).verifies, total


def _mamba_case(seqs, length, device, g):
    H, P, G, N = GRANITE["H"], GRANITE["P"], GRANITE["G"], GRANITE["N"]
    batch, total = _verify_batch(seqs, length, device)
    T, C = seqs * length, H * P + 2 * G * N

    def rnd(*size, scale=1.0, dtype=DTYPE):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    inputs = dict(xbc=rnd(T, C), weight=rnd(C, WIDTH, scale=0.5), bias=rnd(C),
                  x=rnd(T, H, P), dt=rnd(T, H) - 1.0, B=rnd(T, G, N), C=rnd(T, G, N),
                  A=-(torch.rand(H, generator=g) * 4 + 0.5).to(device), D=rnd(H, dtype=torch.float32),
                  dt_bias=rnd(H, scale=0.5, dtype=torch.float32))
    states = dict(conv=rnd(total, C, WIDTH - 1), ssm=rnd(total, H, P, N, scale=0.3))
    return batch, inputs, states


def _mamba_layer(conv_op, ssm_op, batch, i, states):
    """One mixer's verify ops: the conv over xbc, then the SSM (its x, B, C given apart)."""
    conv = conv_op(i["xbc"], i["weight"], i["bias"], states["conv"], batch, "silu")
    y = ssm_op(i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["dt_bias"], states["ssm"], batch,
               (0.0, float("inf")))
    return conv, y


def _delta_case(seqs, length, device, g):
    HK, HV, K, V = QWEN3_NEXT["HK"], QWEN3_NEXT["HV"], QWEN3_NEXT["K"], QWEN3_NEXT["V"]
    batch, total = _verify_batch(seqs, length, device)
    T, C = seqs * length, 2 * HK * K + HV * V

    def rnd(*size, scale=1.0, dtype=DTYPE):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    inputs = dict(xbc=rnd(T, C), weight=rnd(C, WIDTH, scale=0.5), q=rnd(T, HK, K), k=rnd(T, HK, K),
                  v=rnd(T, HV, V), g=-(torch.rand(T, HV, generator=g) * 0.7).to(device),
                  beta=torch.rand(T, HV, generator=g).to(device, DTYPE))
    states = dict(conv=rnd(total, C, WIDTH - 1), ssm=rnd(total, HV, K, V, scale=0.3))
    return batch, inputs, states


def _delta_layer(conv_op, delta_op, batch, i, states):
    conv = conv_op(i["xbc"], i["weight"], None, states["conv"], batch, "silu")
    o = delta_op(i["q"], i["k"], i["v"], i["g"], i["beta"], states["ssm"], batch, K_SCALE)
    return conv, o


PATHS = {
    "granite-4.0-h": (_mamba_case, _mamba_layer,
                      (mamba_conv1d_verify, mamba_state_update_verify),
                      (composed.mamba_conv1d_verify,
                       partial(composed.mamba_state_update_verify, step=mamba_state_update))),
    "qwen3-next": (_delta_case, _delta_layer,
                   (mamba_conv1d_verify, gated_delta_verify),
                   (composed.mamba_conv1d_verify,
                    partial(composed.gated_delta_verify, step=gated_delta_step))),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def _eager_us(fn, calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, k = 3 only")
    args = parser.parse_args()
    device = torch.device("cuda")
    batches, ks = ((16,), (3,)) if args.quick else ((1, 16, 64), (3, 5))
    print(f"{'model':14} {'batch':>5} {'k':>2} | {'graph us fused':>14} {'composed':>9} {'x':>5} | "
          f"{'eager us fused':>14} {'composed':>9} {'x':>5} | max rel diff (out, state)")
    bad = 0
    for name, (case, layer, fused_ops, composed_ops) in PATHS.items():
        for seqs in batches:
            for k in ks:
                g = torch.Generator().manual_seed(seqs * 10 + k)
                batch, inputs, states = case(seqs, k + 1, device, g)
                mine = {n: t.clone() for n, t in states.items()}
                theirs = {n: t.clone() for n, t in states.items()}
                got = layer(*fused_ops, batch, inputs, mine)
                want = layer(*composed_ops, batch, inputs, theirs)
                diff_out = max(_rel(a, b) for a, b in zip(got, want))
                diff_state = max(_rel(mine[n], theirs[n]) for n in states)
                bad += diff_out > TOL or diff_state > TOL
                fused = partial(layer, *fused_ops, batch, inputs, mine)
                comp = partial(layer, *composed_ops, batch, inputs, theirs)
                gf, _ = graph_time_us([fused], reps=10)
                gc, _ = graph_time_us([comp], reps=10)
                ef, ec = _eager_us(fused), _eager_us(comp)
                print(f"{name:14} {seqs:>5} {k:>2} | {gf:>14.1f} {gc:>9.1f} {gc / gf:>5.1f} | "
                      f"{ef:>14.1f} {ec:>9.1f} {ec / ef:>5.1f} | {diff_out:.1e}, {diff_state:.1e}",
                      flush=True)
                del mine, theirs, states
                torch.cuda.empty_cache()
    if bad:
        print(f"{bad} case(s) past the tolerance {TOL}: the fused and composed paths disagree.")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
