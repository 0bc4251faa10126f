"""int4 (AWQ / GPTQ, W4A16) MoE decode kernels against the bf16 MoE decode path (GPU only).

    python3 benchmarks/kernels/bench_moe_int4_decode.py [--json out.json] [--no-flush]
                                                        [--shapes qwen3-30b-a3b,mixtral-8x7b]

One MoE layer of each shape (benchmarks/model-configs): Qwen3-30B-A3B (128 experts, top-8,
hidden 2048, expert intermediate 768) and Mixtral-8x7B (8 experts, top-2, hidden 4096,
intermediate 14336); int4 experts in groups of 128 with uint8 zero codes (AWQ's layout after
load) and float16 scales, activations bf16, routing included (``fused_moe``). Tokens 1, 2, 4,
16; at 1-4 both take their decode kernels (``decode.py``, ``decode_int4.py``), at 16 the
grouped GEMMs. Also timed: int4 with GPTQ act order (``w13_perm``: x gathered per expert),
the int4 grouped GEMMs at the same token counts (``int4_grouped``: the path int4 took at every
size before the decode kernels), the int4 decode kernels at every count (``int4_decode``: at 16
tokens, whether ``DECODE_MAX_TOKENS`` should reach further for int4), and at 1 token the int4
decode kernels with other rows a program (``rows UP,DOWN``). GPU time per call from CUDA-graph
replays, L2 flushed before each (``gpu_timing.gtime``; ``--no-flush``: not). Each int4 decode
result is checked against the pure-torch reference (``int4 rel err``: of the largest output).

Bytes at 1 token, Qwen3: 8 experts x 3 x 2048 x 768: bf16 75.5 MB, int4 18.9 MB + 0.9 MB of
scales and zeros; Mixtral: 2 experts x 3 x 4096 x 14336: bf16 704 MB, int4 176 MB + 8 MB.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_timing import gtime  # noqa: E402

from tessellm.backends.reference.moe import fused_experts_reference  # noqa: E402
from tessellm.kernels.moe import fused_moe, fused_moe_triton, topk_routing  # noqa: E402
from tessellm.kernels.moe.decode_int4 import fused_moe_int4_decode  # noqa: E402
from tessellm.kernels.moe.fused_moe import _tiles  # noqa: E402

SHAPES = {  # experts, top-k, hidden, intermediate
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}
GROUP = 128
DEV = "cuda"
ROWS = [(1, 1), (1, 2), (2, 2), (4, 2), (4, 4), (8, 4)]


def int4_experts(e: int, n: int, k: int):
    codes = torch.randint(-2**31, 2**31 - 1, (e, n, k // 8), dtype=torch.int32, device=DEV)
    scales = (torch.rand(e, n, k // GROUP, device=DEV) * 2e-3 + 1e-3).half()
    zeros = torch.randint(4, 12, (e, n, k // GROUP), dtype=torch.uint8, device=DEV)
    return codes, scales, zeros


def bench_shape(name: str, flush: bool) -> list:
    e, top_k, h, inter = SHAPES[name]
    torch.manual_seed(0)
    dtype = torch.bfloat16
    w13 = (torch.randn(e, 2 * inter, h, device=DEV) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, device=DEV) / inter ** 0.5).to(dtype)
    q13, s13, z13 = int4_experts(e, 2 * inter, h)
    q2, s2, z2 = int4_experts(e, h, inter)
    kw = dict(int4=True, w13_zeros=z13, w2_zeros=z2)
    # GPTQ act order: each expert's w13 inputs in a random order (x gathered through it)
    perm = torch.stack([torch.randperm(h, device=DEV) for _ in range(e)]).to(torch.int32)
    rows = []
    for tokens in (1, 2, 4, 16):
        x = torch.randn(tokens, h, device=DEV).to(dtype)
        logits = torch.randn(tokens, e, device=DEV)
        weights, ids = topk_routing(logits, top_k, "softmax", True)
        row = dict(shape=name, tokens=tokens)
        out = fused_moe(x, logits, q13, q2, top_k, "softmax", True, s13, s2, **kw)
        ref = fused_experts_reference(x, weights, ids, q13, q2, s13, s2, **kw)
        row["int4_max_rel_err"] = ((out.float() - ref.float()).abs().max()
                                   / ref.float().abs().max()).item()
        del ref
        row["bf16_us"] = gtime(lambda: fused_moe(x, logits, w13, w2, top_k), flush=flush)
        row["int4_us"] = gtime(lambda: fused_moe(x, logits, q13, q2, top_k, "softmax", True,
                                                 s13, s2, **kw), flush=flush)
        grouped = _tiles(tokens * top_k, e, x.device, 4)
        row["int4_grouped_us"] = gtime(lambda: fused_moe_triton(x, weights, ids, q13, q2, s13,
                                                                s2, grouped, **kw), flush=flush)
        row["int4_decode_us"] = gtime(lambda: fused_moe_int4_decode(
            x, weights, ids, q13, q2, s13, s2, z13, z2), flush=flush)
        row["int4_act_order_us"] = gtime(lambda: fused_moe(x, logits, q13, q2, top_k,
                                                           "softmax", True, s13, s2,
                                                           w13_perm=perm, **kw), flush=flush)
        row["int4_over_bf16"] = row["int4_us"] / row["bf16_us"]
        rows.append(row)
        print(f"{name} tokens {tokens:3d}: bf16 {row['bf16_us']:7.1f} us  int4 "
              f"{row['int4_us']:7.1f} us (int4/bf16 {row['int4_over_bf16']:.2f})  int4 grouped "
              f"{row['int4_grouped_us']:7.1f} us  decode kernels {row['int4_decode_us']:7.1f}"
              f" us  act-order {row['int4_act_order_us']:7.1f} us"
              f"  int4 rel err {row['int4_max_rel_err']:.1e}", flush=True)
        if tokens == 1:
            sweep = {}
            for up, down in ROWS:
                sweep[f"{up},{down}"] = gtime(lambda: fused_moe_int4_decode(
                    x, weights, ids, q13, q2, s13, s2, z13, z2, up_rows=up, down_rows=down),
                    flush=flush)
            row["int4_decode_rows_us"] = sweep
            best = min(sweep, key=sweep.get)
            print(f"{name} tokens   1: int4 decode rows UP,DOWN "
                  + "  ".join(f"{r} {us:.1f}" for r, us in sweep.items())
                  + f"  (best {best})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--no-flush", action="store_true")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    rows = []
    for name in args.shapes.split(","):
        rows += bench_shape(name, not args.no_flush)
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(DEV),
                                                   flush=not args.no_flush, rows=rows),
                                              indent=1))


if __name__ == "__main__":
    main()
