"""One Qwen3-30B-A3B MoE layer on the GPU: the decode path against the grouped path, tile sweep,
and the contract entry against the reference loop at 1, 64 and 4096 tokens.

    PYTHONPATH=. python3 benchmarks/kernels/moe_decode_probe.py --out $OUT/moe_layer.json

The sweep's fastest rows (``best_rows``) are used by the parts after it, and the most tokens
at which the decode path beat the grouped one (``best_max_tokens``) and whether routing inside
the decode path's first kernel beat a routing launch of its own at 1 token (``best_route``)
are recorded: the driver
(``benchmarks/moe_wave2c.sh``) runs the engine with both.

Layer: 128 experts, top-8, hidden 2048, expert intermediate 768, bf16, softmax routing
renormalized (``fused_moe``: routing included). Kernel times: ``gpu_timing.gtime``, 20 calls
captured in one CUDA graph with a 256 MB buffer fill before each (the L2 never holds the
experts, as in a decode step), PDL on as in the engine's graphs, minus the fills alone. The
reference loop (``backends/reference/moe.py``) syncs the host, so it and, for comparison, the
fused entry are also timed eagerly with ``triton.testing.do_bench``.

Roofline per layer (H200: 4.25 TB/s, ~800 TFLOP/s bf16): one expert is 3 x 2048 x 768 x 2 B =
9.44 MB; 1 token reads 8 of them (75.5 MB, >= 17.8 us); 64 tokens touch ~124 of 128 (>= 275 us);
4096 tokens are compute bound (309 GFLOP, >= 386 us).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402

from gpu_timing import gtime  # noqa: E402
from tessellm.backends.reference.moe import fused_moe_reference  # noqa: E402
from tessellm.kernels.moe import fused_moe  # noqa: E402
from tessellm.kernels.moe.decode import fused_moe_decode  # noqa: E402
from tessellm.kernels.moe.routing import route_triton  # noqa: E402
from tessellm.kernels.pdl import graph_scope  # noqa: E402

E, TOPK, HID, INTER = 128, 8, 2048, 768
SWEEP = [(4, 4), (2, 2), (2, 4), (4, 2), (8, 4), (1, 2)]


def floor_us(tokens: int) -> float:
    touched = E * (1 - (1 - TOPK / E) ** tokens)
    return max(touched * 3 * HID * INTER * 2 / 4.25e12, 2 * tokens * TOPK * 3 * HID * INTER / 800e12) * 1e6


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    res: dict = {"device": torch.cuda.get_device_name()}

    def save():
        args.out.write_text(json.dumps(res, indent=1))

    torch.manual_seed(0)
    w13 = (torch.randn(E, 2 * INTER, HID, device="cuda") / HID ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, HID, INTER, device="cuda") / INTER ** 0.5).to(torch.bfloat16)
    t0 = time.perf_counter()
    # 1. tile sweep of the decode path at 1 token (routing precomputed)
    x = torch.randn(1, HID, device="cuda").to(torch.bfloat16)
    logits = torch.randn(1, E, device="cuda")
    weights, ids = route_triton(logits, TOPK)
    ref = fused_moe_reference(x, logits, w13, w2, TOPK)
    sweep = {}
    with graph_scope():
        for up, down in SWEEP:
            fn = lambda: fused_moe_decode(x, weights, ids, w13, w2, up_rows=up, down_rows=down)  # noqa: E731
            sweep[f"up{up}_down{down}"] = dict(us=round(gtime(fn, flush=True), 1), rel=rel(fn(), ref))
            print("sweep", up, down, sweep[f"up{up}_down{down}"], flush=True)
    res["decode_sweep_1tok_no_routing"] = sweep
    best = min(sweep, key=lambda key: sweep[key]["us"])
    res["best_rows"] = best.replace("up", "").replace("_down", ",")
    os.environ["TESSELLM_MOE_DECODE_ROWS"] = res["best_rows"]  # the rest runs the best tiles
    save()
    # 2. the contract entry, 1..8 tokens (routing included): the decode path with the routing
    #    inside its up kernel (2 launches), with its own routing launch (3), the grouped path (6)
    paths = {}
    variants = (("decode_routed", "8", "1"), ("decode", "8", "0"), ("grouped", "0", "0"))
    for tokens in (1, 2, 4, 8):
        x = torch.randn(tokens, HID, device="cuda").to(torch.bfloat16)
        logits = torch.randn(tokens, E, device="cuda")
        ref = fused_moe_reference(x, logits, w13, w2, TOPK)
        row = {"floor_us": round(floor_us(tokens), 1)}
        for name, limit, route in variants:
            os.environ["TESSELLM_MOE_DECODE_MAX_TOKENS"] = limit
            os.environ["TESSELLM_MOE_DECODE_ROUTE"] = route
            fn = lambda: fused_moe(x, logits, w13, w2, TOPK)  # noqa: E731
            with graph_scope():  # (every launch with PDL: one compiled variant a kernel)
                row[f"{name}_pdl_us"] = round(gtime(fn, flush=True), 1)
                row[f"{name}_rel"] = rel(fn(), ref)
        paths[str(tokens)] = row
        print("paths", tokens, row, flush=True)
        res["decode_vs_grouped"] = paths
        route_wins = paths["1"]["decode_routed_pdl_us"] < paths["1"]["decode_pdl_us"]
        res["best_route"] = int(route_wins)
        best = "decode_routed" if route_wins else "decode"
        res["best_max_tokens"] = max([0] + [int(n) for n, r in paths.items()
                                            if r[f"{best}_pdl_us"] < r["grouped_pdl_us"]])
        save()
    os.environ["TESSELLM_MOE_DECODE_MAX_TOKENS"] = str(res["best_max_tokens"])
    os.environ["TESSELLM_MOE_DECODE_ROUTE"] = str(res["best_route"])
    # 3. the contract entry as it dispatches now vs the reference loop, 1 / 64 / 4096 tokens
    layer = {}
    for tokens in (1, 64, 4096):
        x = torch.randn(tokens, HID, device="cuda").to(torch.bfloat16)
        logits = torch.randn(tokens, E, device="cuda")
        ref = fused_moe_reference(x, logits, w13, w2, TOPK)
        fn = lambda: fused_moe(x, logits, w13, w2, TOPK)  # noqa: E731
        with graph_scope():
            graph_us = gtime(fn, flush=True)
            fused_ms = triton.testing.do_bench(fn)
            err = rel(fn(), ref)
        ref_ms = triton.testing.do_bench(lambda: fused_moe_reference(x, logits, w13, w2, TOPK))
        layer[str(tokens)] = dict(fused_graph_pdl_us=round(graph_us, 1),
                                  fused_eager_us=round(fused_ms * 1e3, 1),
                                  reference_eager_us=round(ref_ms * 1e3, 1),
                                  speedup_vs_reference=round(ref_ms * 1e3 / graph_us, 1),
                                  floor_us=round(floor_us(tokens), 1), rel=err)
        print("layer", tokens, layer[str(tokens)], flush=True)
        res["layer_vs_reference"] = layer
        save()
    res["seconds"] = round(time.perf_counter() - t0, 1)
    save()


if __name__ == "__main__":
    main()
