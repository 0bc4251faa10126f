"""int4 (AWQ / GPTQ, W4A16) fused MoE against the bf16 fused MoE on one Qwen3-30B-A3B layer
(GPU only).

    python3 benchmarks/kernels/bench_moe_int4.py [--json out.json] [--flush] [--sweep]
        [--tokens 1 16 256 1024 2048 4096] [--crossover] [--tc-sweep]

Shapes (benchmarks/model-configs/qwen3-30b-a3b): 128 experts, top-8, hidden 2048, expert
intermediate 768, softmax routing renormalized; int4 experts in groups of 128 with uint8 zero
codes (AWQ's layout after load, ``layers/moe_int4.py``) and float16 scales; activations bf16.
Each time is GPU time per call from CUDA-graph replays (``gpu_timing.gtime``; ``--flush``: L2
flushed before each call). ``int4`` is the engine's dispatch (``kernels/moe/fused_moe.py``:
the int4 decode kernels up to 4 tokens, the tensor-core grouped GEMM, from
``int4_dequant.MOE_INT4_DEQUANT_TOKENS`` tokens the experts dequantized and the 16-bit GEMMs);
the dequantized path never runs inside a graph capture in the engine (its workspace would stay
in the graph's pool), so the bench lets it be captured (``_capturable``) to time it as the
other paths are. The int4 result is checked against the pure-torch reference
(``reference/moe.py``) at the first count above 4 tokens and at the first that dequantizes.

``--crossover``: at each count above 4 tokens (and 384 .. 3072 between), the tensor-core path
(``tc``, TESSELLM_MOE_INT4_DEQUANT_TOKENS=0) against the dequantized one (``deq``), and the
recommended ``MOE_INT4_DEQUANT_TOKENS``: the smallest count from which ``deq`` is faster at
every larger count measured ("crossover: ..." line); first the dequantization alone under a
few program shapes (``dequant_sweep``: us and GB/s). ``--sweep``: the tensor-core path's
alignment block and SiLU fusion (``tile_sweep``: the only parts of ``fused_moe_triton``'s tiles
that reach that kernel); ``--tc-sweep`` (alone) its launch settings (BLOCK_N, warps, stages).

Bytes per layer: bf16 experts 3 x 2048 x 768 x 2 B = 9.44 MB each (1.21 GB for 128); int4
2.36 MB + scales and zeros (3 x 2048 x 6 x 3 B = 0.11 MB) each: ~3.9x fewer. At 1 token 8
experts are read (75.5 MB bf16, 19.8 MB int4); from ~64 tokens on nearly all are. The
dequantized path reads the codes and writes the 16-bit experts (0.3 + 1.21 GB) before the
16-bit GEMMs read them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_timing import gtime  # noqa: E402

from tessellm.backends.reference.moe import fused_moe_reference  # noqa: E402
from tessellm.kernels.moe import fused_moe  # noqa: E402
from tessellm.kernels.moe import int4_dequant as dq  # noqa: E402

E, TOP_K, H, I, GROUP = 128, 8, 2048, 768, 128
DEV = "cuda"


def int4_experts(n: int, k: int, dev: str):
    codes = torch.randint(-2**31, 2**31 - 1, (E, n, k // 8), dtype=torch.int32, device=dev)
    scales = (torch.rand(E, n, k // GROUP, device=dev) * 2e-3 + 1e-3).half()
    zeros = torch.randint(4, 12, (E, n, k // GROUP), dtype=torch.uint8, device=dev)
    return codes, scales, zeros


def _capturable(on: bool = True) -> None:
    """Let the dequantized path run inside the timing graphs (the engine keeps it out of
    captures); off: the engine's rule again."""
    fm = importlib.import_module("tessellm.kernels.moe.fused_moe")
    fm.moe_int4_dequant_applies = ((lambda tokens, device: 0 < dq.moe_int4_dequant_tokens()
                                    <= tokens) if on else dq.moe_int4_dequant_applies)


def _with_threshold(value: int, fn):
    """``fn()`` under TESSELLM_MOE_INT4_DEQUANT_TOKENS=value."""
    old = os.environ.get("TESSELLM_MOE_INT4_DEQUANT_TOKENS")
    os.environ["TESSELLM_MOE_INT4_DEQUANT_TOKENS"] = str(value)
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["TESSELLM_MOE_INT4_DEQUANT_TOKENS"]
        else:
            os.environ["TESSELLM_MOE_INT4_DEQUANT_TOKENS"] = old


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--flush", action="store_true")
    parser.add_argument("--sweep", action="store_true",
                        help="also the tensor-core path's alignment block and fusion")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 1024, 2048, 4096])
    parser.add_argument("--crossover", action="store_true",
                        help="also tensor-core vs dequantized path, and the threshold")
    parser.add_argument("--tc-sweep", action="store_true",
                        help="only: the tensor-core int4 kernel's launch settings "
                             "(kernels/moe/int4_tc_moe.py) at --tokens")
    args = parser.parse_args()
    if args.tc_sweep:
        return tc_sweep(args.tokens, args.flush)
    _capturable()
    torch.manual_seed(0)
    dev, dtype = DEV, torch.bfloat16
    w13 = (torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=dev) / I ** 0.5).to(dtype)
    q13, s13, z13 = int4_experts(2 * I, H, dev)
    q2, s2, z2 = int4_experts(H, I, dev)
    kw = dict(int4=True, w13_zeros=z13, w2_zeros=z2)
    rows = []
    checked = set()
    for tokens in args.tokens:
        x = torch.randn(tokens, H, device=dev).to(dtype)
        logits = torch.randn(tokens, E, device=dev)
        row = dict(tokens=tokens)
        int4 = (lambda: fused_moe(x, logits, q13, q2, TOP_K, "softmax", True, s13, s2, **kw))
        path = ("decode" if tokens <= 4 else "dequantized"
                if 0 < dq.moe_int4_dequant_tokens() <= tokens else "tc")
        row["int4_path"] = path
        if path != "decode" and path not in checked:
            checked.add(path)
            ref = fused_moe_reference(x, logits, q13, q2, TOP_K, "softmax", True, s13, s2, **kw)
            row["int4_max_rel_err"] = ((int4().float() - ref.float()).abs().max()
                                       / ref.float().abs().max()).item()
            del ref
        row["bf16_us"] = gtime(lambda: fused_moe(x, logits, w13, w2, TOP_K), flush=args.flush)
        row["int4_us"] = gtime(int4, flush=args.flush)
        row["int4_over_bf16"] = row["int4_us"] / row["bf16_us"]
        rows.append(row)
        print(f"tokens {tokens:5d}: bf16 {row['bf16_us']:8.1f} us  int4 {row['int4_us']:8.1f} us"
              f"  (int4/bf16 {row['int4_over_bf16']:.2f}, {path})"
              + (f"  int4 rel err vs reference {row['int4_max_rel_err']:.2e}"
                 if "int4_max_rel_err" in row else ""), flush=True)
    cross = crossover(q13, q2, s13, s2, kw, dtype, args.tokens, args.flush) \
        if args.crossover else {}
    sweep = tile_sweep(q13, q2, s13, s2, kw, dtype, args.flush) if args.sweep else []
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(DEV),
                                                   flush=args.flush, rows=rows,
                                                   crossover=cross, sweep=sweep), indent=1))


CROSSOVER_TOKENS = (384, 512, 768, 1024, 1280, 1536, 2048, 3072)  # --crossover's counts too
SWEEP_TOKENS = (16, 256, 1024, 2048)  # --sweep's


def crossover(q13, q2, s13, s2, kw, dtype, token_counts, flush: bool) -> dict:
    """The int4 fused MoE at each count above 4 tokens (``token_counts`` and 384 .. 3072)
    through the tensor-core path (threshold 0) and the dequantized one (threshold 1); the
    recommended threshold: the smallest count from which the dequantized path is faster at
    every larger count measured (None: it never is at the largest)."""
    counts = sorted({t for t in token_counts if t > 4} | set(CROSSOVER_TOKENS))
    deq = dequant_sweep(q13, q2, s13, s2, kw, dtype, flush)
    default_tile = dq.DEQUANT_TILE
    if deq:  # the crossover with the fastest tile (the default to set when it wins)
        dq.DEQUANT_TILE = tuple(min(deq, key=lambda d: d["us"])["tile"])
        print(f"crossover with dequant tile {dq.DEQUANT_TILE} (default {default_tile})", flush=True)
    points = []
    for tokens in counts:
        x = torch.randn(tokens, H, device=DEV).to(dtype)
        logits = torch.randn(tokens, E, device=DEV)
        run = (lambda: fused_moe(x, logits, q13, q2, TOP_K, "softmax", True, s13, s2, **kw))
        tc = _with_threshold(0, lambda: gtime(run, flush=flush))
        deq = _with_threshold(1, lambda: gtime(run, flush=flush))
        points.append(dict(tokens=tokens, tc_us=tc, deq_us=deq))
        print(f"crossover tokens {tokens:5d}: tc {tc:8.1f} us  deq {deq:8.1f} us  "
              f"(deq/tc {deq / tc:.2f})", flush=True)
    best = None
    for p in reversed(points):
        if p["deq_us"] >= p["tc_us"]:
            break
        best = p["tokens"]
    print(f"crossover: dequantize from {best} tokens (MOE_INT4_DEQUANT_TOKENS now "
          f"{dq.MOE_INT4_DEQUANT_TOKENS}; flush={flush})", flush=True)
    tile, dq.DEQUANT_TILE = dq.DEQUANT_TILE, default_tile
    return dict(points=points, recommended=best, dequant=deq, tile=tile)


# session 27 (H100): (16, 16, 4) 2,190 GB/s against 999 for (32, 16, 4), 500-926 for the larger
DEQUANT_TILES = ((16, 16, 4), (32, 16, 4), (8, 16, 4), (8, 16, 2), (16, 16, 2), (16, 8, 4),
                 (16, 32, 4), (8, 32, 4), (4, 32, 4), (16, 16, 8))


def dequant_sweep(q13, q2, s13, s2, kw, dtype, flush: bool) -> list:
    """``int4_dequant.dequantize_int4_experts`` alone on w13 (the first 64 experts: one chunk
    of the default budget) under each ``DEQUANT_TILES`` (rows, words, warps): us and GB/s of
    codes, scales, zeros read and 16-bit weights written; the default's marked."""
    chunk = min(E, 64)
    moved = (q13[:chunk].numel() * 4 + s13[:chunk].numel() * 3
             + q13[:chunk].numel() * 8 * torch.tensor([], dtype=dtype).element_size())
    default, out = dq.DEQUANT_TILE, []
    for tile in DEQUANT_TILES:
        dq.DEQUANT_TILE = tile
        try:
            us = gtime(lambda: dq.dequantize_int4_experts(q13, s13, kw["w13_zeros"], dtype, 0,
                                                          chunk), flush=flush)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  dequant tile {tile} failed: {type(e).__name__}", flush=True)
            continue
        finally:
            dq.DEQUANT_TILE = default
        out.append(dict(tile=tile, us=us, gb_s=moved / us / 1e3))
        print(f"dequant w13 x{chunk} tile {tile}: {us:8.1f} us  {moved / us / 1e3:7.0f} GB/s"
              + ("  (default)" if tile == default else ""), flush=True)
    return out


# (BLOCK_M, SILU_MUL) tried by --sweep: the tensor-core int4 path takes from the tiles only
# the alignment block and whether SiLU-and-mul runs in GEMM 1's epilogue (its own BLOCK_N,
# warps and stages: int4_tc_moe.moe_int4_tc_tiles, swept by --tc-sweep)
SWEEP = [(16, True), (32, True), (64, True), (16, False), (32, False), (64, False),
         (128, False)]


def tile_sweep(q13, q2, s13, s2, kw, dtype, flush: bool) -> list:
    """GPU time of ``fused_moe_triton`` (routing given, the tensor-core path: the dequantized
    one is never taken with given tiles) for each alignment block and fusion of ``SWEEP`` at
    16 .. 2048 tokens, with the default's (``int4_tc_moe.moe_int4_tc_block_m``, fused): data
    to tune that rule. A setting that fails to compile is reported and skipped."""
    from tessellm.kernels.moe import fused_moe_triton, topk_routing
    from tessellm.kernels.moe.int4_tc_moe import moe_int4_tc_block_m

    out = []
    for tokens in SWEEP_TOKENS:
        x = torch.randn(tokens, H, device=DEV).to(dtype)
        weights, ids = topk_routing(torch.randn(tokens, E, device=DEV), TOP_K, "softmax", True)
        best, default = None, moe_int4_tc_block_m(tokens * TOP_K, E)
        for bm, fuse in SWEEP:
            tiles = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, SILU_MUL=fuse)
            try:
                us = gtime(lambda: fused_moe_triton(x, weights, ids, q13, q2, s13, s2, tiles,
                                                    **kw), flush=flush)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  tokens {tokens}: BLOCK_M {bm} fused {fuse} failed: "
                      f"{type(e).__name__}", flush=True)
                continue
            out.append(dict(tokens=tokens, block_m=bm, silu_mul=fuse, int4_us=us))
            print(f"  sweep tokens {tokens:5d}: BLOCK_M {bm:3d} fused {fuse!s:5}: {us:8.1f} us"
                  + ("  (default)" if (bm, fuse) == (default, True) else ""), flush=True)
            best = min(best or (us, bm, fuse), (us, bm, fuse), key=lambda b: b[0])
        if best:
            print(f"sweep tokens {tokens:5d}: best int4 tc {best[0]:8.1f} us with BLOCK_M "
                  f"{best[1]} fused {best[2]} (default BLOCK_M {default} fused)", flush=True)
    return out


def tc_sweep(token_counts, flush: bool) -> None:
    """The int4 fused MoE with the tensor-core grouped GEMMs under each (BLOCK_N, num_warps,
    num_stages) of ``int4_tc_moe.moe_int4_tc_tiles`` (BLOCK_M stays the alignment's): one line
    a token count, the default's time and the best setting's."""
    from tessellm.kernels.moe import int4_tc_moe as tm

    os.environ["TESSELLM_MOE_INT4_DEQUANT_TOKENS"] = "0"  # the tensor-core path at every count
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
