"""bitsandbytes 4-bit (NF4) MoE experts: the fused variant against the layer's dense path and bf16
(GPU only).

    python3 benchmarks/kernels/bench_moe_bnb4.py [--json out.json] [--no-flush]

One Qwen3-30B-A3B MoE layer (128 experts, top-8, hidden 2048, expert intermediate 768; codes
random, absmaxes uniform), activations bf16, the routing given. Per token count (1, 2, 4, 8,
16, 32, 64):

* ``bf16``: ``fused_moe_triton`` on bf16 experts (the bf16 model's path);
* ``bnb4``: ``fused_moe_triton(..., bnb4_code=)`` as the layer calls it (decode kernels up to
  ``BNB4_DECODE_MAX_TOKENS``, the dequantized path beyond);
* ``bnb4_decode`` / ``bnb4_dequant``: each path forced at every count (where the crossover
  lies: ``TESSELLM_MOE_BNB4_DECODE_TOKENS``);
* ``dense``: the layer's path without the variant (``TESSELLM_BNB_MOE_FUSED=0``:
  ``moe_bnb.dense_experts`` in torch, then the bf16 ``fused_moe_triton``).

At 1 token also the decode kernels at other rows a program (``rows UP,DOWN``). GPU time per call
from CUDA-graph replays, L2 flushed before each (``gpu_timing.gtime``). The bnb4 decode result
is checked against the pure-torch reference (``rel err``, of the largest output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_timing import gtime  # noqa: E402

from tessellm.backends.reference.moe import fused_experts_reference, route  # noqa: E402
from tessellm.kernels.moe import fused_moe_triton  # noqa: E402
from tessellm.kernels.moe.decode_bnb4 import fused_moe_bnb4_decode  # noqa: E402
from tessellm.layers import moe_bnb  # noqa: E402
from tessellm.quantization.bnb import NF4_CODE  # noqa: E402

E, TOP_K, H, INTER = 128, 8, 2048, 768
TOKENS = [1, 2, 4, 8, 16, 32, 64]
ROWS = [(1, 1), (2, 2), (4, 2), (4, 4), (8, 4), (8, 8)]
DEV = "cuda"


def experts(n: int, k: int):
    codes = torch.randint(0, 256, (E, n, k // 2), dtype=torch.uint8, device=DEV)
    absmax = torch.rand(E, n, k // 64, device=DEV) * 0.02 + 0.02
    return codes, absmax


def with_decode_tokens(value: str, fn):
    def call():
        old = os.environ.get("TESSELLM_MOE_BNB4_DECODE_TOKENS")
        os.environ["TESSELLM_MOE_BNB4_DECODE_TOKENS"] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["TESSELLM_MOE_BNB4_DECODE_TOKENS"]
            else:
                os.environ["TESSELLM_MOE_BNB4_DECODE_TOKENS"] = old
    return call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--no-flush", action="store_true")
    args = parser.parse_args()
    flush = not args.no_flush
    torch.manual_seed(0)
    code = torch.tensor(NF4_CODE, device=DEV)
    w13, a13 = experts(2 * INTER, H)
    w2, a2 = experts(H, INTER)
    every = torch.arange(E, device=DEV)
    d13 = moe_bnb.dequantize(w13, a13, code, every, torch.bfloat16)
    d2 = moe_bnb.dequantize(w2, a2, code, every, torch.bfloat16)
    layer = SimpleNamespace(w13=w13, w2=w2, w13_absmax=a13, w2_absmax=a2, code=code,
                            expert_map=None)
    rows_out = []
    for t in TOKENS:
        x = torch.randn(t, H, device=DEV, dtype=torch.bfloat16)
        weights, ids = route(torch.randn(t, E, device=DEV), TOP_K)
        ids32 = ids.to(torch.int32)
        bnb = (x, weights, ids32, w13, w2, a13, a2)

        def dense():
            wts, local, e13, e2 = moe_bnb.dense_experts(layer, weights, ids32, torch.bfloat16)
            return fused_moe_triton(x, wts, local.to(torch.int32), e13, e2)

        cases = {
            "bf16": lambda: fused_moe_triton(x, weights, ids32, d13, d2),
            "bnb4": lambda: fused_moe_triton(*bnb, bnb4_code=code),
            "bnb4_decode": lambda: fused_moe_bnb4_decode(*bnb, code),
            "bnb4_dequant": with_decode_tokens("0", lambda: fused_moe_triton(*bnb,
                                                                             bnb4_code=code)),
            "dense": dense,
        }
        if t == 1:
            for up, down in ROWS:
                cases[f"rows {up},{down}"] = (
                    lambda up=up, down=down: fused_moe_bnb4_decode(*bnb, code, up_rows=up,
                                                                   down_rows=down))
        row = {"tokens": t}
        for name, fn in cases.items():
            try:
                row[name] = round(gtime(fn, flush=flush), 1)
            except Exception as exc:  # noqa: BLE001 - one failing case keeps the others
                row[name] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
        want = fused_experts_reference(x, weights, ids, w13, w2, a13, a2, bnb4_code=code)
        got = fused_moe_bnb4_decode(*bnb, code)
        row["rel err"] = float((got.float() - want.float()).abs().max()
                               / want.float().abs().max())
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main()
