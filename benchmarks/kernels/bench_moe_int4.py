"""int4 (AWQ / GPTQ, W4A16) fused MoE against the bf16 fused MoE on one Qwen3-30B-A3B layer
(GPU only).

    python3 benchmarks/kernels/bench_moe_int4.py [--json out.json] [--flush] [--sweep]
        [--tokens 16 64 256] [--tc-sweep]

Shapes (benchmarks/model-configs/qwen3-30b-a3b): 128 experts, top-8, hidden 2048, expert
intermediate 768, softmax routing renormalized; int4 experts in groups of 128 with uint8 zero
codes (AWQ's layout after load, ``layers/moe_int4.py``) and float16 scales; activations bf16.
Tokens 1, 16, 256, 2048. Each time is GPU time per call from CUDA-graph replays
(``gpu_timing.gtime``; ``--flush``: L2 flushed before each call). The int4 result is checked
against the pure-torch reference (``reference/moe.py``) at 16 tokens. ``--sweep`` also times
the int4 grouped GEMMs under a few tile settings (``tile_sweep``); ``--tc-sweep`` (alone) the
tensor-core int4 kernel's settings (TESSELLM_MOE_INT4_TC picks that kernel or the tile one).

Bytes per layer: bf16 experts 3 x 2048 x 768 x 2 B = 9.44 MB each (1.21 GB for 128); int4
2.36 MB + scales and zeros (3 x 2048 x 6 x 3 B = 0.11 MB) each: ~3.9x fewer. At 1 token 8
experts are read (75.5 MB bf16, 19.8 MB int4); from ~64 tokens on nearly all are.
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

from tessellm.backends.reference.moe import fused_moe_reference  # noqa: E402
from tessellm.kernels.moe import fused_moe  # noqa: E402

E, TOP_K, H, I, GROUP = 128, 8, 2048, 768, 128
DEV = "cuda"


def int4_experts(n: int, k: int, dev: str):
    codes = torch.randint(-2**31, 2**31 - 1, (E, n, k // 8), dtype=torch.int32, device=dev)
    scales = (torch.rand(E, n, k // GROUP, device=dev) * 2e-3 + 1e-3).half()
    zeros = torch.randint(4, 12, (E, n, k // GROUP), dtype=torch.uint8, device=dev)
    return codes, scales, zeros


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--flush", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time int4 tile settings")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 2048])
    parser.add_argument("--tc-sweep", action="store_true",
                        help="only: the tensor-core int4 kernel's launch settings "
                             "(kernels/moe/int4_tc_moe.py) at --tokens")
    args = parser.parse_args()
    if args.tc_sweep:
        return tc_sweep(args.tokens, args.flush)
    torch.manual_seed(0)
    dev, dtype = DEV, torch.bfloat16
    w13 = (torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=dev) / I ** 0.5).to(dtype)
    q13, s13, z13 = int4_experts(2 * I, H, dev)
    q2, s2, z2 = int4_experts(H, I, dev)
    kw = dict(int4=True, w13_zeros=z13, w2_zeros=z2)
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, H, device=dev).to(dtype)
        logits = torch.randn(tokens, E, device=dev)
        row = dict(tokens=tokens)
        if tokens == min(t for t in args.tokens if t > 4):
            ref = fused_moe_reference(x, logits, q13, q2, TOP_K, "softmax", True, s13, s2, **kw)
            out = fused_moe(x, logits, q13, q2, TOP_K, "softmax", True, s13, s2, **kw)
            row["int4_max_rel_err"] = ((out.float() - ref.float()).abs().max()
                                       / ref.float().abs().max()).item()
        row["bf16_us"] = gtime(lambda: fused_moe(x, logits, w13, w2, TOP_K), flush=args.flush)
        row["int4_us"] = gtime(lambda: fused_moe(x, logits, q13, q2, TOP_K, "softmax", True,
                                                 s13, s2, **kw), flush=args.flush)
        row["int4_over_bf16"] = row["int4_us"] / row["bf16_us"]
        rows.append(row)
        print(f"tokens {tokens:5d}: bf16 {row['bf16_us']:8.1f} us  int4 {row['int4_us']:8.1f} us"
              f"  (int4/bf16 {row['int4_over_bf16']:.2f})"
              + (f"  int4 rel err vs reference {row['int4_max_rel_err']:.2e}"
                 if "int4_max_rel_err" in row else ""), flush=True)
    sweep = tile_sweep(q13, q2, s13, s2, kw, dtype, args.flush) if args.sweep else []
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(DEV),
                                                   flush=args.flush, rows=rows, sweep=sweep),
                                              indent=1))


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried by --sweep for the int4 grouped GEMMs
SWEEP = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 2), (16, 64, 64, 4, 3), (32, 64, 64, 4, 4),
         (32, 128, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 128, 4, 3), (128, 128, 64, 8, 3),
         (128, 256, 64, 8, 4)]  # (the 16-bit prefill tile: 120 KB of shared memory in int4 now)


def tile_sweep(q13, q2, s13, s2, kw, dtype, flush: bool) -> list:
    """GPU time of ``fused_moe_triton`` (routing given) for each tile of ``SWEEP`` at each token
    count, SiLU-and-mul fused for BLOCK_M <= 32 (as the default): data to tune ``_tiles``' int4
    choice. A tile that fails to compile is reported and skipped."""
    from tessellm.kernels.moe import fused_moe_triton, topk_routing

    out = []
    for tokens in (1, 16, 256, 2048):
        x = torch.randn(tokens, H, device=DEV).to(dtype)
        weights, ids = topk_routing(torch.randn(tokens, E, device=DEV), TOP_K, "softmax", True)
        best = None
        for bm, bn, bk, warps, stages in SWEEP:
            tiles = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
            try:
                us = gtime(lambda: fused_moe_triton(x, weights, ids, q13, q2, s13, s2, tiles,
                                                    **kw), flush=flush)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  tokens {tokens}: tile {tiles} failed: {type(e).__name__}", flush=True)
                continue
            out.append(dict(tokens=tokens, tile=tiles, int4_us=us))
            best = min(best or (us, tiles), (us, tiles), key=lambda b: b[0])
        if best:
            print(f"sweep tokens {tokens:5d}: best int4 {best[0]:8.1f} us with {best[1]}",
                  flush=True)
    return out


def tc_sweep(token_counts, flush: bool) -> None:
    """The int4 fused MoE with the tensor-core grouped GEMMs under each (BLOCK_N, num_warps,
    num_stages) of ``int4_tc_moe.moe_int4_tc_tiles`` (BLOCK_M stays the alignment's): one line
    a token count, the default's time and the best setting's."""
    from tessellm.kernels.moe import int4_tc_moe as tm

    torch.manual_seed(0)
    q13, s13, z13 = int4_experts(2 * I, H, DEV)
    q2, s2, z2 = int4_experts(H, I, DEV)
    kw = dict(int4=True, w13_zeros=z13, w2_zeros=z2)
    tiles = tm.moe_int4_tc_tiles
    for tokens in token_counts:
        x = torch.randn(tokens, H, device=DEV).to(torch.bfloat16)
        logits = torch.randn(tokens, E, device=DEV)
        run = (lambda: fused_moe(x, logits, q13, q2, TOP_K, "softmax", True, s13, s2, **kw))
        base = gtime(run, flush=flush)
        best = (base, "default")
        for bn, warps in ((64, 4), (128, 4), (128, 8)):
            for stages in (2, 3, 4):
                cfg = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)
                tm.moe_int4_tc_tiles = lambda bm, cfg=cfg: cfg
                try:
                    us = gtime(run, flush=flush)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"  tokens {tokens}: {cfg} failed: {type(e).__name__}", flush=True)
                    continue
                finally:
                    tm.moe_int4_tc_tiles = tiles
                if us < best[0]:
                    best = (us, str(cfg))
        print(f"tcsweep tokens {tokens:5d}: default {base:8.1f} us, best {best[0]:8.1f} us "
              f"({best[1]})", flush=True)


if __name__ == "__main__":
    main()
