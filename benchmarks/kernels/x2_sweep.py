"""The one-row e4m3 GEMV (``gemv_fp8_x2``) by launch shape on Llama-3.1-8B's layer shapes
(GPU only), and the table of winners for ``tessellm/kernels/gemm/gemv_x2_table.py``.

    python3 benchmarks/kernels/x2_sweep.py --out DIR [--write-table]

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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from tessellm.kernels.gemm import gemv_x2
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


def candidates() -> list:
    """Launch shapes swept on every shape: the default first, then the tiled kernel's, then
    the streamed kernel's (one program a tile or 4, 8, 16 an SM; with and without prefetch)."""
    out = [None] + list(OLD_TILES)
    for t in TILES:
        out += [t + (per_sm, True) for per_sm in (0, 4, 8, 16)]
        out += [t + (per_sm, False) for per_sm in (0, 8)]
    return out


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
           round(n * k / 4.25e6, 2), "copies": len(copies), "configs": {}}
    for cfg in candidates():
        key = "default" if cfg is None else str(cfg)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            with graph_scope():  # the launch the graph takes (PDL): one compile
                out = gemv_x2.gemv_fp8_x2(x, w.qweight, w.scales, config=cfg)
            bad = _check(out, ref, base)
            us = None if bad else graph_us(
                [lambda q=q, c=cfg: gemv_x2.gemv_fp8_x2(x, q, w.scales, config=c) for q in copies])
        except Exception as e:  # noqa: BLE001 - a launch shape that does not compile or fit
            bad, us = f"{type(e).__name__}: {e}"[:160], None
        row = {"s": round(time.perf_counter() - t0, 1)}
        if bad:
            row["error"] = bad
        else:
            row.update(us=round(us, 2), gbs=round(n * k / us / 1e3))
        res["configs"][key] = row
        print(name, key, json.dumps(row), flush=True)
    timed = {c: r["us"] for c, r in res["configs"].items() if "us" in r}
    best = min(timed, key=timed.get)
    res["best"] = best
    res["default_us"] = timed.get("default")
    res["best_us"] = timed[best]
    del copies
    torch.cuda.empty_cache()
    return res


def _parse(key: str):
    return None if key == "default" else tuple(json.loads(key.replace("(", "[").replace(
        ")", "]").replace("True", "true").replace("False", "false")))


def layers_section(table: dict, n_layers: int = 8) -> dict:
    """The four GEMVs of ``n_layers`` layers in one graph: default shapes vs ``table``'s."""
    layers = [{nm: quantize_fp8(torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02)
               for nm, (n, k) in SHAPES.items()} for _ in range(n_layers)]
    xs = {nm: torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
          for nm, (n, k) in SHAPES.items()}
    nbytes = sum(n * k for n, k in SHAPES.values())
    out = {}
    for label, cfgs in (("default", {}), ("tuned", table)):
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


TABLE_HEAD = '''"""Launch shapes of ``gemv_fp8_x2`` by exact weight shape (N, K), chosen by measurement
(``benchmarks/kernels/x2_sweep.py`` writes this file; no autotuning at serve time). A value is
(block_n, block_kw, num_warps) for ``_gemv_e4m3_x2_kernel`` or (block_n, block_kw, num_warps,
programs_per_sm, prefetch) for ``_gemv_e4m3_x2_stream_kernel``. Shapes not here take
``gemv_x2_config``'s rules.
{source}"""

X2_TABLE: dict = {{
{rows}}}
'''


def write_table(path: Path, table: dict, source: str) -> None:
    rows = "".join(f"    {nk}: {cfg},\n" for nk, cfg in sorted(table.items()))
    path.write_text(TABLE_HEAD.format(source=source, rows=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--write-table", action="store_true",
                   help="rewrite tessellm/kernels/gemm/gemv_x2_table.py with the winners")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = {"device": torch.cuda.get_device_name(), "shapes": {}}
    table = {}
    for name, (n, k) in SHAPES.items():
        r = sweep_shape(name, n, k)
        res["shapes"][name] = r
        best = _parse(r["best"])
        if best is not None and r["best_us"] < (1 - MIN_GAIN) * r["default_us"]:
            table[(n, k)] = best
        (args.out / "x2_sweep.json").write_text(json.dumps(res, indent=1))
    res["table"] = {str(nk): cfg for nk, cfg in table.items()}
    res["layers"] = layers_section(table)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "x2_sweep.json").write_text(json.dumps(res, indent=1))
    for name, r in res["shapes"].items():
        print(f"{name:8s} default {r['default_us']} us -> best {r['best_us']} us "
              f"({r['best']}), floor {r['floor_us_4.25TBs']}")
    if args.write_table:
        path = Path(gemv_x2.__file__).with_name("gemv_x2_table.py")
        write_table(path, table, f"\n{res['device']}, {time.strftime('%Y-%m-%d')}: "
                    f"x2_sweep.json in benchmarks/results/ (see benchmarks/README.md).\n")
        (args.out / "gemv_x2_table.py").write_text(path.read_text())
        print("table written:", table)


if __name__ == "__main__":
    main()
