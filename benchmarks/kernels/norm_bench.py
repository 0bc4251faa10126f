"""The RMSNorm kernels alone (GPU only): GPU microseconds a call (CUDA-graph replays,
``gpu_timing.gtime``) of ``rms_norm``, ``fused_add_rms_norm``, their fp8 variants (the fp8
activation fold) and the stand-alone per-token quantizer, bf16, at Llama-8B (4096) and 32B
(5120) hidden sizes and 1 to 4096 rows.

Written for issue 22's fix (the norm kernels sum the squares with ``kernels/pairwise_sum.py``:
one shared-memory step per warp bit instead of one for all warps): run it as is, then with the
norm kernels of the commit before the fix, on the same warm machine, and compare the columns::

    python3 benchmarks/kernels/norm_bench.py --out after.json
    git checkout 40e9149 -- tessellm/kernels/norm.py tessellm/backends/cuda/allreduce_norm.py
    python3 benchmarks/kernels/norm_bench.py --out before.json
    git checkout HEAD -- tessellm/kernels/norm.py tessellm/backends/cuda/allreduce_norm.py

(``before`` keeps the fix's ``fp8_rows.py``: its ``div_rn`` is one division a row.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_timing import gtime  # noqa: E402

ROWS = (1, 32, 256, 512, 4096)
HIDDEN = (4096, 5120)
FP8 = torch.float8_e4m3fn


def _ops(x, r, w):
    from tessellm.kernels.fused_ops import TritonOps
    from tessellm.kernels.gemm.fp8 import quantize_fp8_rows

    ops = TritonOps()
    return {
        "rms_norm": lambda: ops.rms_norm(x, w, 1e-6),
        "add_rms_norm": lambda: ops.fused_add_rms_norm(x, r, w, 1e-6),
        "rms_norm_fp8": lambda: ops.rms_norm_fp8(x, w, 1e-6, FP8),
        "add_rms_norm_fp8": lambda: ops.fused_add_rms_norm_fp8(x, r, w, 1e-6, FP8),
        "quantize_rows": lambda: quantize_fp8_rows(x, FP8, keepdim=True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    print(torch.cuda.get_device_name(), "commit", commit or "unknown", flush=True)
    table = []
    for hidden in HIDDEN:
        for rows in ROWS:
            x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
            r = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
            us = {name: round(gtime(fn, reps=50), 2) for name, fn in _ops(x, r, w).items()}
            table.append({"hidden": hidden, "rows": rows, **us})
            print(f"hidden {hidden:5d} rows {rows:5d}  " +
                  "  ".join(f"{k} {v:7.2f}" for k, v in us.items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                        "commit": commit, "us": table}, indent=1))


if __name__ == "__main__":
    main()
