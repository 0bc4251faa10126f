"""The tile GEMM for decode-sized row counts (``tessellm/kernels/gemm/decode_gemm.py``) against
cuBLAS (``F.linear``) at Llama-3.1-8B's four decoder products, GPU only. The gate_up product
is timed as the engine runs it: cuBLAS then ``TritonOps.silu_and_mul`` against the dual kernel
with the activation in its epilogue.

Each call reads its own weight copy (enough copies for 512 MB, cycled inside the CUDA graph),
so the L2 never holds the next call's weights; ``gpu_timing.gtime`` times CUDA-graph replays.
Every launch shape is first checked against the float64 product (relative error). Writes one
JSON: per row count and product, microseconds and TFLOP/s of cuBLAS, the default launch shape
and each swept one; and per row count the layer's four products summed (cuBLAS, default, best).

    python benchmarks/kernels/decode_gemm_bench.py --out DIR/decode_gemm.json [--rows 128 256 512]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import gtime  # noqa: E402

from tessellm.kernels.fused_ops import TritonOps  # noqa: E402
from tessellm.kernels.gemm import decode_gemm as dg  # noqa: E402

# name: (output columns, K, silu): Llama-3.1-8B, tensor_parallel_size 1
PRODUCTS = {"qkv": (6144, 4096, False), "o": (4096, 4096, False),
            "gate_up": (14336, 4096, True), "down": (4096, 14336, False)}
SWEEP = [dg.DecodeGemmConfig(*c) for c in [
    (128, 64, 64, 4, 4), (128, 64, 64, 4, 3), (128, 64, 64, 8, 4), (128, 128, 64, 8, 4),
    (128, 128, 64, 8, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 128, 4, 3),
    (128, 32, 128, 4, 4), (256, 64, 64, 8, 3)]]


DEV = "cuda"  # the CPU dry run (tests: --dry-run) swaps in "cpu", tiny products, no timing


def _copies(n_rows: int, k: int, dtype) -> list[torch.Tensor]:
    per = n_rows * k * 2
    count = max(2, (512 << 20) // per + 1) if DEV == "cuda" else 2
    return [torch.randn(n_rows, k, device=DEV).mul_(0.02).to(dtype) for _ in range(count)]


def tiles_name(c: dg.DecodeGemmConfig) -> str:
    """As TESSELLM_DECODE_GEMM_SILU_TILES takes it: BLOCK_MxBLOCK_NxBLOCK_KxWARPSxSTAGES."""
    return "x".join(str(v) for v in (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages))


def _timed(fn, weights) -> float:
    it = itertools.cycle(weights)
    return gtime(lambda: fn(next(it)), reps=len(weights) * 2)


def bench(rows: list[int], sweep: bool, out: Path, dtype=torch.bfloat16) -> dict:
    ops = TritonOps()
    res = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)",
           "dtype": str(dtype), "rows": {}}
    for m in rows:
        per = res["rows"][str(m)] = {}
        for name, (n, k, silu) in PRODUCTS.items():
            n_rows = 2 * n if silu else n
            ws = _copies(n_rows, k, dtype)
            x = torch.randn(m, k, device=DEV).to(dtype)
            flop = 2 * m * n_rows * k
            exact = x.double() @ ws[0].double().t()
            if silu:
                exact = F.silu(exact[:, :n]) * exact[:, n:]

            def cublas(w):
                y = F.linear(x, w)
                return ops.silu_and_mul(y) if silu else y

            def triton_fn(cfg):
                if silu:
                    return lambda w: dg.decode_gemm_silu_and_mul(x, w, config=cfg)
                return lambda w: dg.decode_gemm(x, w, config=cfg)

            entry = per[name] = {}
            configs = [("default", None)] + ([(tiles_name(c), c) for c in SWEEP] if sweep else [])
            for label, fn in [("cublas", cublas)] + [(lbl, triton_fn(c)) for lbl, c in configs]:
                try:
                    y = fn(ws[0])
                    err = ((y.double() - exact).norm() / exact.norm()).item()
                    us = _timed(fn, ws)
                    entry[label] = {"us": round(us, 2), "tflops": round(flop / us / 1e6, 1),
                                    "rel_err": float(f"{err:.2e}")}
                except Exception as e:  # noqa: BLE001 - a launch shape that does not fit
                    entry[label] = {"error": f"{type(e).__name__}: {e}"[:200]}
            ok = {lbl: v for lbl, v in entry.items() if lbl != "cublas" and "us" in v
                  and v["rel_err"] < 2e-2}
            best = min(ok, key=lambda lbl: ok[lbl]["us"]) if ok else None
            entry["best"] = best
            print(f"M={m} {name}: cublas {entry['cublas'].get('us')} us, default "
                  f"{entry['default'].get('us')}, best {best} {ok[best]['us'] if best else None}",
                  flush=True)
            del ws
            if DEV == "cuda":
                torch.cuda.empty_cache()
        layer = {}
        for label in ("cublas", "default"):
            vals = [per[p][label].get("us") for p in PRODUCTS]
            layer[label] = round(sum(vals), 2) if None not in vals else None
        bests = [per[p][per[p]["best"]]["us"] if per[p]["best"] else None for p in PRODUCTS]
        layer["best"] = round(sum(bests), 2) if None not in bests else None
        layer["best_or_cublas"] = round(sum(
            min(per[p]["cublas"].get("us", 1e9), per[p][per[p]["best"]]["us"] if per[p]["best"]
                else 1e9) for p in PRODUCTS), 2)
        per["layer_us"] = layer
        print(f"M={m} layer (4 products) us: {layer}", flush=True)
        out.write_text(json.dumps(res, indent=1))  # after each row count: a time box keeps them
    return res


def choose(path: str, rows: str = "256") -> tuple[str, str, str]:
    """From a written JSON, the engine setting its ``rows``-row figures favour: the
    TESSELLM_DECODE_GEMM value (the SiLU product where the dual kernel's best beats cuBLAS +
    SiLU-and-mul; the plain products where the default launch shape's sum over o + down, or
    qkv + o + down, beats cuBLAS's), TESSELLM_DECODE_GEMM_MAX_N (4096 or 6144 on Llama-8B) and
    TESSELLM_DECODE_GEMM_SILU_TILES (the dual kernel's winner where it beats the default by
    >= 3%). With nothing winning: "silu" (still measured in the engine), no bound, no tiles."""
    per = json.loads(Path(path).read_text())["rows"][rows]

    def us(name, label):
        return per[name].get(label, {}).get("us")

    gu = per["gate_up"]
    best = gu.get("best")
    silu = bool(best) and us("gate_up", best) < us("gate_up", "cublas")
    tiles = best if silu and best != "default" and us("gate_up", best) < 0.97 * us(
        "gate_up", "default") else ""
    gains = {}
    for max_n, names in ((4096, ("o", "down")), (6144, ("qkv", "o", "down"))):
        vals = [(us(n, "cublas"), us(n, "default")) for n in names]
        if all(c is not None and t is not None for c, t in vals):
            gains[max_n] = sum(c - t for c, t in vals)
    max_n = max(gains, key=gains.get) if gains and max(gains.values()) > 0 else None
    dg_value = "1" if silu and max_n else "silu" if silu else "linear" if max_n else "silu"
    return dg_value, str(max_n or ""), tiles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--rows", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--no-sweep", action="store_true", help="cuBLAS and the default shape only")
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU (TRITON_INTERPRET=1): tiny products, untimed (a script check)")
    p.add_argument("--choose", action="store_true",
                   help="read --out (written before) and print the setting its 256-row figures "
                        "favour: TESSELLM_DECODE_GEMM, _MAX_N and _SILU_TILES values ('-': unset)")
    args = p.parse_args()
    if args.choose:
        print(" ".join(v or "-" for v in choose(args.out)))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        global DEV, _timed
        DEV = "cpu"
        PRODUCTS.update({name: (n // 256, k // 256, silu) for name, (n, k, silu) in PRODUCTS.items()})
        SWEEP[:] = [dg.DecodeGemmConfig(16, 16, 16, 1, 1)]
        _timed = lambda fn, weights: (fn(weights[0]), 1.0)[1]  # noqa: E731
    elif not torch.cuda.is_available():
        sys.exit("decode_gemm_bench.py needs a CUDA GPU (or --dry-run)")
    t0 = time.perf_counter()
    res = bench(args.rows, not args.no_sweep, out,
                torch.float32 if args.dry_run else torch.bfloat16)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
