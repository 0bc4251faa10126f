"""The one-row e4m3 GEMV (``gemv_fp8_x2``) by launch shape on Llama-3.1-8B's layer shapes
(GPU only), and the table of winners for ``tessellm/kernels/gemm/gemv_x2_table.py``.

    python3 benchmarks/kernels/x2_sweep.py --out DIR [--write-table] [--quick] [--bf16]

Each shape's weight is cloned until the copies pass 1.5 GB (nothing stays in the 60 MB L2);
one CUDA graph calls the GEMV once on each copy, back to back, with PDL (``graph_scope``, as
the engine's decode graph runs), and the median of 5 replays over the copies is the time a
call (GB/s: weight bytes over it). Every launch shape is first checked against the float64
product of the dequantized weight (relative error < 8e-3, every output written) and against
the current default's output (the same per-word products, so within one bf16 rounding); a
shape that fails is reported and never chosen. A winner replaces the default in the table
only if it is at least 3% faster (``MIN_GAIN``: one launch shape timed twice in one run
differed by 2.2% on the H200, 2026-12-04). Then ``layers``: qkv, o, gate_up, down of 8 layers (own
weights each) in one graph with PDL, default launch shapes against the winners, which is the
GEMV part of a B1 decode step (without the LM head, bf16 in the engine's fp8 mode).

Split K combined in the launch (``split_last.py``, TESSELLM_GEMV_SPLIT_LAST): 4-tuples
(block_n, block_kw, warps, split) at every split that gives the tile's K steps a different
division (``split_candidates``), checked like the others and, beyond, bitwise on a second call.
The fastest one of a shape goes into ``SPLIT_TABLE`` if it beats the old launch (the default
or its ``X2_TABLE`` winner) by ``MIN_GAIN``. ``--bf16``: the same for ``gemv``'s FMA kernel at one
bf16 row (``BF16_SPLIT_TABLE``), the default tiles against split ones. ``--quick``: of the old
launch shapes only the tiled kernel's (``OLD_TILES``, ``QUICK_TILES``) and the o projection's
best two streamed ones (2026-12-04).
Shapes the engine runs right after a small kernel (``AFTER_NORM``: qkv, gate_up after an
add-RMSNorm, o after the attention) are also timed as pairs, the Triton add-RMSNorm of x then
the GEMV on its output, back to back over the copies (``us_after_norm``): the PDL boundary the
chain has, where the GEMV's programs are resident and read their first weight tile while the
small kernel runs; those shapes rank launch shapes (and pick winners) by that time, down by the
plain one. Every shape prints an ``x2-summary`` line (``bf16-summary``): old and best new, us and TB/s.
The sweep runs with the flag off (``split_last.ENABLED``), so "default" is the old launch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

import triton

from tessellm.kernels.gemm import gemv as gv
from tessellm.kernels.gemm import gemv_x2, split_last
from tessellm.kernels.pdl import graph_scope
from tessellm.quantization.packed import quantize_fp8
from tessellm.testing.timing import graph_time_us

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
DEV = "cuda"
MIN_GAIN = 0.03  # a winner must beat the default by this much (the timing spread: 2.2%)
COPY_BYTES = 1.5e9  # weight copies a graph rotates through (the L2 holds 60 MB)
TILES = [(4, 256, 4), (4, 512, 4), (2, 512, 4), (8, 256, 4), (8, 512, 8), (16, 256, 8),
         (4, 1024, 8)]
OLD_TILES = [(4, 256, 4), (2, 512, 4), (1, 512, 4)]  # the tiled kernel, split by its rule
QUICK_STREAM = [(8, 512, 8, 8, False), (8, 512, 8, 0, False)]  # o's best two, 2026-12-04
# --quick: also two tiles of 8 KB a step (whole K = 4096 in one step at 2 x 1024 words), not
# swept in the tiled kernel before its weight tile was read before the PDL wait
QUICK_TILES = [(2, 1024, 4), (4, 512, 4)]
SPLIT_TILES = [(2, 512, 4), (4, 256, 4), (1, 512, 4), (2, 256, 4), (4, 512, 4)]
SPLITS = (2, 4)
# bf16 FMA kernel at one row, the small shapes: (block_n, block_k, warps, chunk) and splits
BF16_SHAPES = ("qkv", "o")
BF16_TILES = [(2, 1024, 4, 8), (1, 1024, 4, 8)]
BF16_SPLITS = (2, 4)
QUICK = False
AFTER_NORM = ("qkv", "o", "gate_up")  # ranked by the norm + GEMV pair time


def split_candidates(k: int) -> list:
    """(block_n, block_kw, warps, split) for K = ``k``: each tile of ``SPLIT_TILES`` at each
    split of ``SPLITS`` that divides its K steps differently (the split as the launch takes
    it: whole steps a range)."""
    out = []
    for bn, bkw, warps in SPLIT_TILES:
        steps = triton.cdiv(k // 4, bkw)
        for s in SPLITS:
            eff = triton.cdiv(steps, triton.cdiv(steps, s))
            if eff > 1 and (bn, bkw, warps, eff) not in out:
                out.append((bn, bkw, warps, eff))
    return out


def candidates(k: int) -> list:
    """Launch shapes swept on every shape: the default first, then the tiled kernel's, then
    the streamed kernel's (one program a tile or 4, 8, 16 an SM; with and without prefetch;
    ``--quick``: two), then the split ones combined in the launch."""
    out = [None] + list(OLD_TILES)
    if QUICK:
        out += QUICK_TILES + QUICK_STREAM
    else:
        for t in TILES:
            out += [t + (per_sm, True) for per_sm in (0, 4, 8, 16)]
            out += [t + (per_sm, False) for per_sm in (0, 8)]
    return out + split_candidates(k)


def _after_norm(k: int):
    """``f(gemv)`` -> gemv(add-RMSNorm(x)): the small kernel before the GEMV (its x an output
    of the kernel before, as in the chain)."""
    from tessellm.kernels.fused_ops import TritonOps

    ops = TritonOps()
    h = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    res = torch.zeros_like(h)
    g = torch.ones(k, device=DEV, dtype=torch.bfloat16)
    return lambda gemv: (lambda: gemv(ops.fused_add_rms_norm(h, res, g, 1e-5)[0]))


def graph_us(fn_list, replays: int = 5) -> float:
    """Microseconds a call: one graph calling each of ``fn_list`` once, under PDL."""
    with graph_scope():
        return graph_time_us(fn_list, reps=len(fn_list), replays=replays)[0]


def _check(out, ref, base) -> str:
    if not torch.isfinite(out).all():
        return "non-finite output"
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    if rel > 8e-3:
        return f"relative error {rel:.2e}"
    ulp = base.float().abs().clamp_min(1e-30) * 2.0 ** -7
    if not ((out.float() - base.float()).abs() <= ulp + 1e-6).all():
        return "differs from the default by more than one bf16 rounding"
    return ""


def sweep_shape(name: str, n: int, k: int) -> dict:
    w = quantize_fp8(torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02)
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    ref = (x.double() @ w.dequantize().double().t())
    copies = [w.qweight] + [w.qweight.clone() for _ in range(max(1, int(COPY_BYTES // (n * k))))]
    base = gemv_x2.gemv_fp8_x2(x, w.qweight, w.scales)
    res = {"default": list(gemv_x2.gemv_x2_config(n, k)), "floor_us_4.25TBs":
           round(n * k / 4.25e6, 2), "copies": len(copies), "configs": {},
           "ranked_by": "us_after_norm" if name in AFTER_NORM else "us"}
    pair = _after_norm(k)
    for cfg in candidates(k):
        key = "default" if cfg is None else str(cfg)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            with graph_scope():  # the launch the graph takes (PDL): one compile
                out = gemv_x2.gemv_fp8_x2(x, w.qweight, w.scales, config=cfg)
                again = gemv_x2.gemv_fp8_x2(x, w.qweight, w.scales, config=cfg)
            bad = _check(out, ref, base)
            if not bad and not torch.equal(out, again):
                bad = "not the same bits on a second call"
            us = None if bad else graph_us(
                [lambda q=q, c=cfg: gemv_x2.gemv_fp8_x2(x, q, w.scales, config=c) for q in copies])
            us_norm = None if bad or name not in AFTER_NORM else graph_us(
                [pair(lambda a, q=q, c=cfg: gemv_x2.gemv_fp8_x2(a, q, w.scales, config=c))
                 for q in copies])
        except Exception as e:  # noqa: BLE001 - a launch shape that does not compile or fit
            bad, us = f"{type(e).__name__}: {e}"[:160], None
        row = {"s": round(time.perf_counter() - t0, 1)}
        if bad:
            row["error"] = bad
        else:
            row.update(us=round(us, 2), gbs=round(n * k / us / 1e3))
            if us_norm is not None:
                row["us_after_norm"] = round(us_norm, 2)
        res["configs"][key] = row
        print(name, key, json.dumps(row), flush=True)
    timed = {c: r[res["ranked_by"]] for c, r in res["configs"].items() if "us" in r}
    best = min(timed, key=timed.get)
    res["best"] = best
    res["default_us"] = timed.get("default")
    res["best_us"] = timed[best]
    old = {c: u for c, u in timed.items() if c == "default" or len(_parse(c)) != 4}
    new = {c: u for c, u in timed.items() if c != "default" and len(_parse(c)) == 4}
    res["best_old"] = min(old, key=old.get) if old else None
    res["best_new"] = min(new, key=new.get) if new else None
    _summary("x2-summary", name, n * k, res, timed)
    del copies
    torch.cuda.empty_cache()
    return res


def _summary(tag: str, name: str, nbytes: int, res: dict, timed: dict) -> None:
    """One line: the default (old) launch, the best old one, the best new (split) one, each
    alone (us, TB/s) and, where ranked so, after a norm (the pair's us)."""
    parts = [f"{tag} {name} (ranked by {res['ranked_by']})"]
    for label, key in (("old", "default"), ("best old", res.get("best_old")),
                       ("best split", res.get("best_new"))):
        if key in timed:
            row = res["configs"][key]
            txt = f"{label} {key}: {row['us']:.2f} us {nbytes / row['us'] / 1e6:.2f} TB/s"
            if "us_after_norm" in row:
                txt += f", after a norm {row['us_after_norm']:.2f} us"
            parts.append(txt)
    print(" | ".join(parts), flush=True)


def _parse(key: str):
    return None if key == "default" else tuple(json.loads(key.replace("(", "[").replace(
        ")", "]").replace("True", "true").replace("False", "false")))


def layers_section(table: dict, split_table: dict, n_layers: int = 8) -> dict:
    """The four GEMVs of ``n_layers`` layers in one graph: default shapes vs ``table``'s
    (old launches) vs ``split_table``'s over those (the split ones)."""
    layers = [{nm: quantize_fp8(torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02)
               for nm, (n, k) in SHAPES.items()} for _ in range(n_layers)]
    xs = {nm: torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
          for nm, (n, k) in SHAPES.items()}
    nbytes = sum(n * k for n, k in SHAPES.values())
    out = {}
    for label, cfgs in (("default", {}), ("tuned", table),
                        ("split", {**table, **split_table})):
        fns = [lambda w=lay[nm], nm=nm, cfgs=cfgs: gemv_x2.gemv_fp8_x2(
            xs[nm], w.qweight, w.scales, config=cfgs.get(SHAPES[nm]))
            for lay in layers for nm in SHAPES]
        us_layer = graph_us(fns) * len(SHAPES)
        out[label] = {"us_per_layer": round(us_layer, 2),
                      "gbs": round(nbytes / us_layer / 1e3),
                      "ms_32_layers": round(us_layer * 32 / 1e3, 4)}
    out["floor_us_per_layer_4.25TBs"] = round(nbytes / 4.25e6, 2)
    print("layers", json.dumps(out), flush=True)
    return out


TABLE_HEAD = \
    '''"""Launch shapes of the one-row GEMVs by exact weight shape (N, K), chosen by measurement
(``benchmarks/kernels/x2_sweep.py`` writes this file; no autotuning at serve time).

``X2_TABLE`` (``gemv_fp8_x2``, always consulted): a value is (block_n, block_kw, num_warps) for
``_gemv_e4m3_x2_kernel`` (K split by its rule) or (block_n, block_kw, num_warps,
programs_per_sm, prefetch) for ``_gemv_e4m3_x2_stream_kernel``. Shapes not here take
``gemv_x2_config``'s rules.

``SPLIT_TABLE`` (``gemv_fp8_x2``) and ``BF16_SPLIT_TABLE`` (``gemv``'s FMA kernel at one 16-bit
row), consulted first and only under ``TESSELLM_GEMV_SPLIT_LAST=1``: (block_n, block_kw or
block_k, num_warps, split), K split ``split`` ways, the partial sums combined by each tile's
last program (``split_last.py``). Only shapes where a split beat the old launch by
``MIN_GAIN``; the others keep the old launch under the flag too.
``PREWAIT_TILES`` (``gemv_fp8_x2``, under the same flag): weight tiles a program reads before
its PDL wait for that shape, instead of ``TESSELLM_GEMV_PREWAIT``'s count; the sweep keeps it
as it finds it (it times the GEMV after a norm, not after the attention, o's predecessor).
{source}"""

X2_TABLE: dict = {{
{rows}}}

SPLIT_TABLE: dict = {{
{split_rows}}}

PREWAIT_TILES: dict = {{
{prewait_rows}}}

BF16_SPLIT_TABLE: dict = {{
{bf16_rows}}}
'''


def _rows(table: dict) -> str:
    return "".join(f"    {nk}: {cfg},\n" for nk, cfg in sorted(table.items()))


def write_table(path: Path, table: dict, split_table: dict, bf16_table: dict,
                source: str) -> None:
    from tessellm.kernels.gemm.gemv_x2_table import PREWAIT_TILES

    path.write_text(TABLE_HEAD.format(source=source, rows=_rows(table),
                                      split_rows=_rows(split_table),
                                      prewait_rows=_rows(PREWAIT_TILES),
                                      bf16_rows=_rows(bf16_table)))


def _bf16_config(cfg):
    if cfg is None:
        return None
    bn, bk, warps, chunk, split = cfg
    return gv.GemvConfig(block_n=bn, block_k=bk, num_warps=warps, stages=1, split_k=split,
                         chunk=chunk, split_last=True)


def bf16_sweep_shape(name: str, n: int, k: int) -> dict:
    """``gemv``'s FMA kernel at one bf16 row: the default launch against split ones
    (``BF16_TILES`` x ``BF16_SPLITS``, each the split the launch takes), as ``sweep_shape``."""
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ w.double().t()
    copies = [w] + [w.clone() for _ in range(max(1, int(COPY_BYTES // (2 * n * k))))]
    base = gv.gemv(x, w)
    cands = [None]
    for bn, bk, warps, chunk in BF16_TILES:
        steps = triton.cdiv(k, bk)
        for s in BF16_SPLITS:
            eff = triton.cdiv(steps, triton.cdiv(steps, s))
            if eff > 1 and (bn, bk, warps, chunk, eff) not in cands:
                cands.append((bn, bk, warps, chunk, eff))
    d = gv.gemv_config(1, n, k, False)
    res = {"default": [d.block_n, d.block_k, d.num_warps, d.chunk, d.split_k],
           "floor_us_4.25TBs": round(2 * n * k / 4.25e6, 2), "configs": {},
           "ranked_by": "us_after_norm" if name in AFTER_NORM else "us"}
    pair = _after_norm(k)
    for cfg in cands:
        key = "default" if cfg is None else str(cfg)
        try:
            c = _bf16_config(cfg)
            with graph_scope():
                out = gv.gemv(x, w, config=c)
                again = gv.gemv(x, w, config=c)
            bad = _check(out, ref, base)
            if not bad and not torch.equal(out, again):
                bad = "not the same bits on a second call"
            us = None if bad else graph_us([lambda q=q, c=c: gv.gemv(x, q, config=c)
                                            for q in copies])
            us_norm = None if bad or name not in AFTER_NORM else graph_us(
                [pair(lambda a, q=q, c=c: gv.gemv(a, q, config=c)) for q in copies])
        except Exception as e:  # noqa: BLE001
            bad, us = f"{type(e).__name__}: {e}"[:160], None
        row = {"error": bad} if bad else {"us": round(us, 2), "gbs": round(2 * n * k / us / 1e3)}
        if not bad and us_norm is not None:
            row["us_after_norm"] = round(us_norm, 2)
        res["configs"][key] = row
        print("bf16", name, key, json.dumps(row), flush=True)
    timed = {c: r[res["ranked_by"]] for c, r in res["configs"].items() if "us" in r}
    res["default_us"] = timed.get("default")
    new = {c: u for c, u in timed.items() if c != "default"}
    res["best_old"] = "default"
    res["best_new"] = min(new, key=new.get) if new else None
    res["best_new_us"] = new.get(res["best_new"])
    _summary("bf16-summary", name, 2 * n * k, res, timed)
    del copies
    torch.cuda.empty_cache()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--write-table", action="store_true",
                   help="rewrite tessellm/kernels/gemm/gemv_x2_table.py with the winners "
                        "(always written to DIR/gemv_x2_table.py)")
    p.add_argument("--quick", action="store_true",
                   help="of the old launch shapes only the tiled ones and two streamed ones")
    p.add_argument("--bf16", action="store_true",
                   help="also the bf16 FMA kernel against split ones (BF16_SPLIT_TABLE)")
    args = p.parse_args()
    global QUICK
    QUICK = args.quick
    split_last.ENABLED = False  # "default": the old launch, whatever the environment says
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = {"device": torch.cuda.get_device_name(), "shapes": {}}
    table, split_table, bf16_table = {}, {}, {}
    for name, (n, k) in SHAPES.items():
        r = sweep_shape(name, n, k)
        res["shapes"][name] = r
        timed = {c: v[r["ranked_by"]] for c, v in r["configs"].items() if "us" in v}
        best = _parse(r["best_old"]) if r["best_old"] else None
        if best is not None and timed[r["best_old"]] < (1 - MIN_GAIN) * r["default_us"]:
            table[(n, k)] = best
        old_us = timed[r["best_old"]] if (n, k) in table else r["default_us"]
        if r["best_new"] and old_us and timed[r["best_new"]] < (1 - MIN_GAIN) * old_us:
            split_table[(n, k)] = _parse(r["best_new"])
        (args.out / "x2_sweep.json").write_text(json.dumps(res, indent=1))
    if args.bf16:
        res["bf16"] = {}
        for name in BF16_SHAPES:
            n, k = SHAPES[name]
            r = bf16_sweep_shape(name, n, k)
            res["bf16"][name] = r
            if r["best_new"] and r["default_us"] and \
                    r["best_new_us"] < (1 - MIN_GAIN) * r["default_us"]:
                bn, bk, warps, chunk, split = _parse(r["best_new"])
                if chunk == 8:  # BF16_SPLIT_TABLE's entries take chunk 8
                    bf16_table[(n, k)] = (bn, bk, warps, split)
            (args.out / "x2_sweep.json").write_text(json.dumps(res, indent=1))
    res["table"] = {str(nk): cfg for nk, cfg in table.items()}
    res["split_table"] = {str(nk): cfg for nk, cfg in split_table.items()}
    res["bf16_split_table"] = {str(nk): cfg for nk, cfg in bf16_table.items()}
    res["layers"] = layers_section(table, split_table)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "x2_sweep.json").write_text(json.dumps(res, indent=1))
    for name, r in res["shapes"].items():
        print(f"{name:8s} default {r['default_us']} us -> best {r['best_us']} us "
              f"({r['best']}), floor {r['floor_us_4.25TBs']}")
    source = (f"\n{res['device']}, {time.strftime('%Y-%m-%d')}: x2_sweep.json in "
              f"benchmarks/results/ (see benchmarks/README.md).\n")
    write_table(args.out / "gemv_x2_table.py", table, split_table, bf16_table, source)
    if args.write_table:
        path = Path(gemv_x2.__file__).with_name("gemv_x2_table.py")
        path.write_text((args.out / "gemv_x2_table.py").read_text())
    print("table" + (" written" if args.write_table else " proposed") + ":", table,
          "split:", split_table, "bf16 split:", bf16_table, flush=True)


if __name__ == "__main__":
    main()
