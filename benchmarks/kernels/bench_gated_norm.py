"""The recurrent mixers' gated RMSNorm on a GPU: the one-launch Triton kernel
(``kernels/gated_norm.py``, what the cuda backend's ``FusedOps.gated_rms_norm`` runs) against the
torch ops the layers ran before (``backends/reference/gated_norm.py``: casts, SiLU, products and
``F.rms_norm``), one layer's worth.

Shapes (bfloat16, one tensor-parallel rank): Mamba2-2.7B (one group of 5120), Granite 4.0-H
small (one group of 8192), Nemotron-H 8B (8 groups of 1024), Qwen3-Next-80B (32 value heads of
128, one shared weight); 1 / 16 / 256 / 4096 rows (decodes to a prefill chunk). Per case: the
milliseconds per call of each (CUDA events around back-to-back eager calls: launches in, as an
eager step runs them), the speed-up, and the largest difference relative to the largest value
(exit 1 past 2e-2: a bf16 rounding or two).

    python benchmarks/kernels/bench_gated_norm.py      (repo root, on a GPU)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tessellm.backends.reference.gated_norm import gated_rms_norm as torch_ops
from tessellm.kernels.gated_norm import gated_rms_norm as fused

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_timing
from gpu_timing import events_ms  # noqa: E402

# name: (channels, group size, weight shared by the groups, mode)
SHAPES = {"mamba2-2.7b": (5120, 5120, False, "gate_then_norm"),
          "granite-4.0-h-small": (8192, 8192, False, "gate_then_norm"),
          "nemotron-h-8b": (8192, 1024, False, "gate_then_norm"),
          "qwen3-next-80b": (4096, 128, True, "norm_round_then_gate")}
ROWS = [1, 16, 256, 4096]
DTYPE = torch.bfloat16
TOL = 2e-2


def main() -> int:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    worst = 0.0
    print(f"{'model':22s} {'rows':>6s} {'torch ms':>9s} {'fused ms':>9s} {'x':>6s} {'diff':>9s}")
    for name, (channels, group, shared, mode) in SHAPES.items():
        for rows in ROWS:
            y = torch.randn(rows, channels, generator=g, device=dev).to(DTYPE)
            wide = torch.randn(rows, 2 * channels + 64, generator=g, device=dev).to(DTYPE)
            z = wide[:, :channels]  # a column view of the projection, as the mixers pass it
            w = torch.randn(group if shared else channels, generator=g, device=dev).to(DTYPE)
            want = torch_ops(y, z, w, group, 1e-5, mode).float()
            got = fused(y, z, w, group, 1e-5, mode).float()
            diff = ((got - want).abs().max() / want.abs().max()).item()
            worst = max(worst, diff)
            iters = 200 if rows <= 256 else 50
            t_torch = events_ms(lambda: torch_ops(y, z, w, group, 1e-5, mode), iters)
            t_fused = events_ms(lambda: fused(y, z, w, group, 1e-5, mode), iters)
            print(f"{name:22s} {rows:6d} {t_torch:9.4f} {t_fused:9.4f} {t_torch / t_fused:6.1f} "
                  f"{diff:9.2e}", flush=True)
    print(f"largest relative difference {worst:.2e} (tolerance {TOL:.0e})")
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
