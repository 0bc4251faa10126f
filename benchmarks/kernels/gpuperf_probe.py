"""Kernel-level probe for issue 22/24's GPU speed goals (GPU only): fp8 prefill GEMMs, the fused
MoE at 1/64/4096 tokens, prefill attention against SDPA flash, the fp8 M=1 GEMV.

    python3 benchmarks/kernels/gpuperf_probe.py --out DIR [--sections gemm moe attn gemv]
        [--deadline SECONDS]

Every time is GPU time of CUDA-graph replays (``gtime``, gpu_timing.py: the call captured
``reps`` times in one graph, the median replay over ``reps``), so host launch costs are out;
memory-bound cases (``flush=True``) write a 256 MB buffer before each call (L2 flush) and
subtract that buffer's own time. Each section writes ``DIR/<section>.json`` as soon as it
ends; a section started after ``--deadline`` seconds is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_timing import eager_us, gtime, run_sections  # noqa: E402

START = time.perf_counter()
_PARTIAL: list = []  # [path, dict] of the running section: saved as results come (time boxes)


def _save() -> None:
    if _PARTIAL:
        _PARTIAL[0].write_text(json.dumps(_PARTIAL[1], indent=1))


LAYER = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def gemm_section(out: dict) -> None:
    """fp8 vs bf16 GEMMs of one Llama-3.1-8B layer at prefill row counts."""
    from tessellm.kernels.gemm.fp8 import quantize_fp8_rows
    from tessellm.kernels.gemm.quant_ops import TritonQuantOps
    from tessellm.kernels.gemm.weight_only import fp8_w8a16_tiled
    from tessellm.quantization.packed import quantize_fp8

    ops = TritonQuantOps()
    ws, fp8 = {}, {}
    for name, (n, k) in LAYER.items():
        ws[name] = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        fp8[name] = quantize_fp8(ws[name])
    rows = {}
    for m in (32, 64, 128, 256, 512, 1024, 2048):
        per = {}
        for name, (n, k) in LAYER.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w, q = ws[name], fp8[name]
            xq, sx = quantize_fp8_rows(x, q.qweight.dtype)
            r = {"bf16": gtime(lambda: F.linear(x, w)),
                 "fp8_mm": gtime(lambda: ops.fp8_mm(x, q)),
                 "quant": gtime(lambda: quantize_fp8_rows(x, q.qweight.dtype)),
                 "scaled_mm": gtime(lambda: torch._scaled_mm(
                     xq, q.qweight.t(), scale_a=sx[:, None], scale_b=q.scales[None, :],
                     out_dtype=torch.bfloat16))}
            if m <= 256:
                r["w8a16"] = gtime(lambda: fp8_w8a16_tiled(x, q.qweight, q.scales))
            if m >= 512:
                r["dequant_linear"] = gtime(lambda: F.linear(
                    x, (q.qweight.to(torch.bfloat16) * q.scales[:, None].to(torch.bfloat16))))
            per[name] = {kk: round(v, 1) for kk, v in r.items()}
        total = {kk: round(sum(per[nm].get(kk, 0) for nm in LAYER), 1) for kk in per["qkv"]}
        rows[m] = {"per_gemm": per, "layer": total}
        print("gemm M", m, "layer us", total, flush=True)
    # One prefill's worth of GEMMs, eager and back to back (what the engine's eager prefill
    # launches): host-bound if this is far above the graph time.
    m = 512
    xs = {nm: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for nm, (n, k) in LAYER.items()}

    def chain(kind):
        for _ in range(32):
            for nm in LAYER:
                if kind == "bf16":
                    F.linear(xs[nm], ws[nm])
                else:
                    ops.fp8_mm(xs[nm], fp8[nm])

    out["eager_32_layers_M512_us"] = {kind: round(eager_us(lambda: chain(kind)), 1)
                                      for kind in ("bf16", "fp8")}
    out["graph_32_layers_M512_us"] = {kind: round(gtime(lambda: chain(kind), reps=1), 1)
                                      for kind in ("bf16", "fp8")}
    print("32 layers M=512 eager", out["eager_32_layers_M512_us"], "graph",
          out["graph_32_layers_M512_us"], flush=True)
    out["rows"] = rows


E, TOPK, HID, INTER = 128, 8, 2048, 768
MOE_TILES = {
    1: [(16, 64, 128, 4, 4), (16, 64, 64, 4, 5), (16, 32, 128, 4, 4), (16, 64, 256, 4, 3),
        (16, 128, 128, 4, 3), (16, 32, 256, 4, 3), (16, 64, 128, 2, 4)],
    64: [(32, 64, 64, 4, 4), (16, 256, 128, 8, 2), (16, 128, 128, 4, 2), (16, 64, 128, 4, 4),
         (32, 128, 128, 4, 3), (16, 128, 256, 4, 2), (16, 64, 256, 4, 3)],
    4096: [(64, 128, 64, 4, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
           (64, 256, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4)],
}


def moe_section(out: dict) -> None:
    from torch.profiler import ProfilerActivity, profile

    from tessellm.kernels.moe.fused_moe import fused_moe_triton, topk_routing

    torch.manual_seed(0)
    w13 = (torch.randn(E, 2 * INTER, HID, device="cuda") / HID ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, HID, INTER, device="cuda") / INTER ** 0.5).to(torch.bfloat16)
    for tokens, cands in MOE_TILES.items():
        x = torch.randn(tokens, HID, device="cuda").to(torch.bfloat16)
        weights, ids = topk_routing(torch.randn(tokens, E, device="cuda"), TOPK, "softmax", True)
        base = fused_moe_triton(x, weights, ids, w13, w2).float()
        res = {"default_us": round(gtime(lambda: fused_moe_triton(x, weights, ids, w13, w2),
                                         flush=True), 1)}
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fused_moe_triton(x, weights, ids, w13, w2)
            torch.cuda.synchronize()
        res["kernels_us"] = sorted(
            ((round(getattr(e, "device_time_total", 0), 1), e.key[:50])
             for e in prof.key_averages()), reverse=True)[:12]
        sweep = []
        for bm, bn, bk, nw, ns in cands:
            tiles = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
            try:
                got = fused_moe_triton(x, weights, ids, w13, w2, tiles=tiles).float()
                err = ((got - base).abs().max() / base.abs().max()).item()
                us = gtime(lambda: fused_moe_triton(x, weights, ids, w13, w2, tiles=tiles),
                           flush=True)
                sweep.append(dict(tiles=[bm, bn, bk, nw, ns], us=round(us, 1), err=err))
            except Exception as e:  # noqa: BLE001 - a config that does not fit is reported
                sweep.append(dict(tiles=[bm, bn, bk, nw, ns], error=str(e)[:100]))
            print("moe", tokens, sweep[-1], flush=True)
        res["sweep"] = sweep
        out[str(tokens)] = res
        print("moe", tokens, "default", res["default_us"], res["kernels_us"][:6], flush=True)


ATTN_TILES = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2),
              (128, 32, 4, 3), (64, 128, 4, 2), (32, 64, 4, 3), (128, 64, 4, 3)]


def attn_section(out: dict) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench_attention import D, H, KVH, make_batch  # noqa: E402 (this folder)
    from tessellm.kernels.attention import prefill_attention

    gen = torch.Generator().manual_seed(0)
    for num, plen in ((1, 512), (16, 512), (1, 2048), (1, 8192)):
        q, k, v, kc, vc, b = make_batch([plen] * num, [plen] * num, gen)
        flops = 4 * num * plen * (plen + 1) // 2 * H * D
        qd = q.view(num, plen, H, D).transpose(1, 2)
        kd = k.view(num, plen, KVH, D).transpose(1, 2).repeat_interleave(H // KVH, 1)
        vd = v.view(num, plen, KVH, D).transpose(1, 2).repeat_interleave(H // KVH, 1)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa = gtime(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True))
        res = {"sdpa_flash_us": round(sdpa, 1)}
        base = None
        for tiles in ATTN_TILES:
            o = torch.full_like(q, float("nan"))
            run = lambda: prefill_attention(  # noqa: E731
                q, kc, vc, o, b.query_start_loc, b.seq_lens, b.block_tables, D ** -0.5,
                seq_offset=0, num_seqs=num, max_query_len=plen, tiles=tiles)
            try:
                us = gtime(run)
            except Exception as e:  # noqa: BLE001
                res[str(tiles)] = str(e)[:100]
                continue
            ok = not torch.isnan(o).any().item()
            if base is not None:
                ok = ok and (o.float() - base).abs().max().item() < 2e-2
            base = o.float() if base is None else base
            res[str(tiles)] = dict(us=round(us, 1), tflops=round(flops / us / 1e6, 1), ok=ok)
        out[f"{num}x{plen}"] = res
        print("attn", num, plen, json.dumps(res), flush=True)


def gemv_section(out: dict) -> None:
    """fp8 M=1 (gemv_fp8_x2) by config and split-K on the layer's shapes, weights past the L2."""
    from tessellm.kernels.gemm.gemv_x2 import gemv_fp8_x2, gemv_x2_config
    from tessellm.quantization.packed import quantize_fp8

    shapes = dict(LAYER, lm_head=(128256, 4096))
    for name, (n, k) in shapes.items():
        q = quantize_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        res = {"default": round(gtime(lambda: gemv_fp8_x2(x, q.qweight, q.scales), flush=True), 2),
               "floor_us_4.3TBs": round(n * k / 4.3e6, 2), "config": gemv_x2_config(n, k)}
        if name != "lm_head":
            for cfg in ((2, 512, 4), (4, 256, 4), (1, 512, 4), (2, 256, 4), (4, 512, 8)):
                for split in (1, 2, 4):
                    res[f"{cfg} split {split}"] = round(gtime(
                        lambda: gemv_fp8_x2(x, q.qweight, q.scales, config=cfg, split_k=split),
                        flush=True), 2)
        out[name] = res
        print("gemv", name, json.dumps(res), flush=True)


def _old_length(pairs: int, num_experts: int, block_m: int) -> int:
    """The alignment's length before 2026-12-04's moefast (every expert may hold a block)."""
    return -(-(pairs + num_experts * (block_m - 1)) // block_m) * block_m


def _legacy_moe(x, logits, w13, w2):
    """The fused MoE as it was at 5b0d0f4 (torch routing, torch alignment with a radix sort,
    torch SiLU-and-mul, the old tiles): the first "before" of the same run."""
    from tessellm.backends.reference.moe import route
    from tessellm.kernels.moe.align import align_by_expert
    from tessellm.kernels.moe.fused_moe import _expert_gemm

    weights, ids = route(logits, TOPK, "softmax", True)
    t, k = ids.shape
    pairs = t * k
    if pairs <= 2 * E:
        tiles = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif pairs <= 32 * E:
        tiles = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
    else:
        tiles = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
    sorted_ids, block_expert, num_padded = align_by_expert(ids, E, tiles["BLOCK_M"])
    c1 = torch.empty(pairs, 2 * INTER, dtype=x.dtype, device=x.device)
    _expert_gemm(x, w13, None, None, sorted_ids, block_expert, num_padded, c1, k, tiles)
    act = F.silu(c1[:, :INTER]) * c1[:, INTER:]
    c2 = torch.empty(pairs, HID, dtype=x.dtype, device=x.device)
    _expert_gemm(act, w2, None, weights.float().contiguous().view(-1), sorted_ids, block_expert,
                 num_padded, c2, 1, tiles)
    return c2.view(t, k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)


def _main_1550193_moe(x, logits, w13, w2):
    """The fused MoE as on main at 1550193 (gpuperf): torch routing (4-5 launches), Triton
    alignment, GEMM 1, SiLU-and-mul kernel, GEMM 2, torch sum and cast, its tiles; run with
    ``_old_length`` patched in (grid of every expert's possible block)."""
    from tessellm.backends.reference.moe import route
    from tessellm.kernels.moe.align import align_by_expert_triton
    from tessellm.kernels.moe.fused_moe import _expert_gemm, _silu_and_mul, _tiles

    weights, ids = route(logits, TOPK, "softmax", True)
    t, k = ids.shape
    tiles = _tiles(t * k, E, x.device)
    align = align_by_expert_triton(ids, E, tiles["BLOCK_M"])
    c1 = torch.empty(t * k, 2 * INTER, dtype=x.dtype, device=x.device)
    _expert_gemm(x, w13, None, None, *align, c1, k, tiles)
    act = _silu_and_mul(c1, INTER)
    c2 = torch.empty(t * k, HID, dtype=x.dtype, device=x.device)
    _expert_gemm(act, w2, None, weights.contiguous().view(-1), *align, c2, 1, tiles)
    return c2.view(t, k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)


def moe_quick_section(out: dict) -> None:
    """Per layer, with routing: 5b0d0f4 (``_legacy_moe``), main at 1550193 (``_main_1550193_
    moe``), now (``fused_moe``: Triton routing, bounded grid, SiLU in GEMM 1, one-launch top-k
    sum) without and with PDL (the engine's CUDA graphs use PDL on sm90; ``graph_scope``)."""
    from unittest import mock

    from tessellm.kernels.moe import align as align_mod
    from tessellm.kernels.moe.fused_moe import fused_moe
    from tessellm.kernels.pdl import graph_scope

    torch.manual_seed(0)
    w13 = (torch.randn(E, 2 * INTER, HID, device="cuda") / HID ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, HID, INTER, device="cuda") / INTER ** 0.5).to(torch.bfloat16)
    for tokens in (1, 8, 64, 4096):
        x = torch.randn(tokens, HID, device="cuda").to(torch.bfloat16)
        logits = torch.randn(tokens, E, device="cuda")

        def new():
            return fused_moe(x, logits, w13, w2, TOPK, "softmax", True)

        def old():
            return _legacy_moe(x, logits, w13, w2)

        def main():
            return _main_1550193_moe(x, logits, w13, w2)

        with mock.patch.object(align_mod, "_length", _old_length):
            ref = old().float()
            main_diff = ((main().float() - ref).abs().max() / ref.abs().max()).item()
            before = gtime(old, flush=True)
            before_main = gtime(main, flush=True)
        err = ((new().float() - ref).abs().max() / ref.abs().max()).item()
        touched = E * (1 - (1 - TOPK / E) ** tokens)
        floor = max(touched * 3 * HID * INTER * 2 / 4.25e12,
                    2 * tokens * TOPK * 3 * HID * INTER / 800e12) * 1e6
        after = gtime(new, flush=True)
        with graph_scope():
            after_pdl = gtime(new, flush=True)
        out[str(tokens)] = dict(before_5b0d0f4_us=round(before, 1),
                                before_1550193_us=round(before_main, 1),
                                after_us=round(after, 1), after_pdl_us=round(after_pdl, 1),
                                floor_us=round(floor, 1), rel_diff=err, rel_diff_1550193=main_diff)
        print("moe", tokens, out[str(tokens)], flush=True)
        _save()


def attn_quick_section(out: dict) -> None:
    """Prefill attention, old default tiles against the new default, SDPA flash and SDPA's own
    backend choice (cuDNN on an H200) with GQA, dense causal tensors."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench_attention import D, H, KVH, make_batch  # noqa: E402 (this folder)
    from tessellm.kernels.attention import prefill_attention

    gen = torch.Generator().manual_seed(0)
    for num, plen in ((1, 512), (16, 512), (1, 2048), (1, 8192)):
        q, k, v, kc, vc, b = make_batch([plen] * num, [plen] * num, gen)
        qd = q.view(num, plen, H, D).transpose(1, 2)
        kd = k.view(num, plen, KVH, D).transpose(1, 2)
        vd = v.view(num, plen, KVH, D).transpose(1, 2)
        kr, vr = kd.repeat_interleave(H // KVH, 1), vd.repeat_interleave(H // KVH, 1)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = gtime(lambda: F.scaled_dot_product_attention(qd, kr, vr, is_causal=True))
        auto = gtime(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True,
                                                            enable_gqa=True))
        res = {"sdpa_flash_us": round(flash, 1), "sdpa_default_us": round(auto, 1)}
        o = torch.empty_like(q)
        for name, tiles in (("before_us", (128, 64, 8, 2)), ("after_us", None)):
            res[name] = round(gtime(lambda: prefill_attention(
                q, kc, vc, o, b.query_start_loc, b.seq_lens, b.block_tables, D ** -0.5,
                seq_offset=0, num_seqs=num, max_query_len=plen, tiles=tiles)), 1)
        out[f"{num}x{plen}"] = res
        print("attn", num, plen, res, flush=True)
        _save()


def host_section(out: dict) -> None:
    """Host microseconds per call of the fp8 prefill GEMM's pieces (M = 64, a small N so that
    the GPU is not the bound), back to back, one sync at the end."""
    from tessellm.kernels.gemm import quant_ops as qo
    from tessellm.kernels.gemm.fp8 import quantize_fp8_rows
    from tessellm.quantization.packed import quantize_fp8

    w = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    q = quantize_fp8(w)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    xq, sx = quantize_fp8_rows(x, q.qweight.dtype)
    wt, s1, s2 = q.qweight.t(), sx[:, None], q.scales[None, :]

    def per_call(fn, iters=400):
        return round(eager_us(fn, iters), 2)

    out["F.linear bf16"] = per_call(lambda: F.linear(x, w))
    out["quantize_fp8_rows"] = per_call(lambda: quantize_fp8_rows(x, q.qweight.dtype))
    out["torch._scaled_mm"] = per_call(lambda: torch._scaled_mm(
        xq, wt, scale_a=s1, scale_b=s2, out_dtype=torch.bfloat16))
    out["torch.empty"] = per_call(lambda: torch.empty(64, 4096, device="cuda"))
    before, after = qo.TritonQuantOps(), qo.TritonQuantOps()
    before.lean_w8a8, after.lean_w8a8 = False, True
    out["fp8_mm before"] = per_call(lambda: before.fp8_mm(x, q))
    out["fp8_mm after"] = per_call(lambda: after.fp8_mm(x, q))
    print("host us per call", out, flush=True)


SECTIONS = {"gemm": gemm_section, "moe": moe_section, "attn": attn_section, "gemv": gemv_section,
            "moe_quick": moe_quick_section, "attn_quick": attn_quick_section,
            "host": host_section}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS))
    p.add_argument("--deadline", type=float, default=1e9)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run_sections(args.out, args.sections, SECTIONS, args.deadline, START, _PARTIAL)


if __name__ == "__main__":
    main()
