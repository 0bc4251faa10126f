"""Skinny GEMMs of decode (M = 1..32 rows) on Llama-3.1-8B shapes: cuBLAS vs Triton (GPU only).

    PYTHONPATH=. python3 benchmarks/kernels/gemv_bench.py --out $OUT/gemv.json [--sweep]

Per weight shape (N, K) and rows M: cuBLAS bf16 (``F.linear``), the Triton bf16 skinny GEMM
(``gemv.gemv``), the tiled fp8 W8A16 kernel (``quant_kernels.fp8_w8a16_tiled``, all that
``fp8_w8a16`` ran before), the fp8 skinny GEMM (``gemv.gemv_fp8``) and ``fp8_w8a16`` as it
dispatches now (the skinny GEMM where ``_gemv_fp8_faster``, else the tiled kernel); and W8A8 on
the fp8 tensor cores (``gemv.gemv_w8a8``: ``fp8_w8a8`` quantizes x inside the kernel,
``fp8_w8a8_preq`` by ``quant_kernels.quantize_fp8_rows`` first, timed together), checked
against x quantized per row.

Timing: 20 back-to-back calls captured in one CUDA graph, replayed; microseconds per call are
the median over replays / 20. The 20 calls rotate over copies of the weight (enough for 256
MB, at most 20: 168 MB for the smallest, o_tp2 in e4m3), so the L2 (50-60 MB) never holds the
weight being read: every call reads it from HBM, as a decode step does. TB/s = weight bytes /
time (x and y are under 0.1% of it). Each new-kernel result is checked against float32
dequantize-then-matmul before it is timed.

``--sweep``: times every candidate tile config of the new kernels (``candidates``) per weight
kind, M and shape (``--sweep-kinds/-m/-shapes``), next to cuBLAS or the tiled fp8 kernel
("ref"), and records the fastest three; ``gemv.gemv_config``'s table was written from it.
Triton compiles the candidates first in ``--jobs`` processes (disk cache). One JSON file goes
to ``--out``, rewritten after each stage; a table is printed last.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from tessellm.kernels.gemm import common, fp8, w8a8  # noqa: E402
from tessellm.kernels.gemm import gemv as gv  # noqa: E402
from tessellm.kernels.gemm import weight_only as qk  # noqa: E402
from tessellm.quantization.packed import quantize_fp8  # noqa: E402
from tessellm.testing.timing import graph_time_us  # noqa: E402

SHAPES = {  # (N, K) of Llama-3.1-8B's GEMMs: one layer at TP=1, the LM head, TP=2 shards
    "qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
    "lm_head": (128256, 4096),
    "qkv_tp2": (3072, 4096), "o_tp2": (4096, 2048), "gate_up_tp2": (14336, 4096),
    "down_tp2": (4096, 7168),
}
LAYER = ["qkv", "o", "gate_up", "down"]
SWEEP_SHAPES = ["qkv", "o", "gate_up", "down", "o_tp2", "down_tp2"]
METHODS = ["cublas_bf16", "gemv_bf16", "fp8_old", "fp8_new", "fp8_w8a16", "fp8_w8a8",
           "fp8_w8a8_preq"]
REPS, ROTATE_BYTES = 20, 256 << 20
TOL = 8e-3  # relative error vs float32 reference: one bf16 rounding of an fp32 sum


# --------------------------------------------------------------------------------------------
# Candidates for the sweep
# --------------------------------------------------------------------------------------------


def candidates(fp8: bool, m: int) -> list[gv.GemvConfig]:
    """FMA tiles (M <= 4) of 1 or 2 KB per weight row and step, with and without the
    per-step chunk sum (e4m3: decoded to float32 by bits); tensor-core tiles for every M."""
    bm = 1 << (m - 1).bit_length()
    out = []
    for row_bytes in (1024, 2048) if m <= 4 else ():
        bk = row_bytes // (1 if fp8 else 2)
        for bn in (2, 4, 8):
            for warps in (4, 8):
                for chunk in (0, 16 if fp8 else 8):
                    if bm * bn * bk // (32 * warps * (chunk or 1)) > 128:  # fp32 accumulators
                        continue
                    out.append(gv.GemvConfig(bn, bk, warps, 1, chunk=chunk, f32_bits=fp8))
    for bn in (16, 32, 64):
        for bk in (128, 256, 512):
            for stages in (1, 3, 4):
                out.append(gv.GemvConfig(bn, bk, 4, stages, dot=True))
    return out


def w8a8_candidates() -> list[gv.GemvConfig]:
    """Tiles of ``gemv_w8a8``: one or two warpgroups' MMA rows, 128-512 codes a step."""
    return [gv.GemvConfig(bn, bk, warps, stages, dot=True)
            for bn, warps in ((64, 4), (128, 4), (128, 8)) for bk in (128, 256, 512)
            for stages in (3, 4, 6)]


def cfg_name(c: gv.GemvConfig) -> str:
    return (f"{'dot' if c.dot else 'fma'} n{c.block_n} k{c.block_k} w{c.num_warps} "
            f"s{c.stages}" + (f" split{c.split_k}" if c.split_k > 1 else "")
            + (f" c{c.chunk}" if c.chunk else "") + (" bits" if c.f32_bits else ""))


def with_split(c: gv.GemvConfig, n: int, k: int) -> gv.GemvConfig:
    return gv._with_split(c, n, k, common._num_sms(torch.cuda.current_device()))


# --------------------------------------------------------------------------------------------
# Data and ops
# --------------------------------------------------------------------------------------------


class Weights:
    """Copies of one shape's weight in bf16 and fp8 (scales per channel), enough of them that
    a rotation over the copies reads ROTATE_BYTES or the whole weight once."""

    def __init__(self, n: int, k: int, copies: bool = True):
        g = torch.Generator(device="cuda").manual_seed(n * 7 + k)
        w = torch.randn(n, k, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
        q = quantize_fp8(w)
        nb = -(-ROTATE_BYTES // w.nbytes) if copies else 1
        nq = -(-ROTATE_BYTES // q.qweight.nbytes) if copies else 1
        self.bf16 = [w] + [w.clone() for _ in range(min(nb, REPS) - 1)]
        self.fp8 = [(q.qweight, q.scales)] + [(q.qweight.clone(), q.scales.clone())
                                              for _ in range(min(nq, REPS) - 1)]
        self.n, self.k = n, k

    def reference(self, fp8: bool) -> torch.Tensor:
        """The weight in float32, dequantized."""
        if fp8:
            return self.fp8[0][0].float() * self.fp8[0][1][:, None]
        return self.bf16[0].float()

    def x(self, m: int) -> torch.Tensor:
        g = torch.Generator(device="cuda").manual_seed(m)
        return torch.randn(m, self.k, generator=g, device="cuda", dtype=torch.bfloat16)

    def nbytes(self, method: str) -> int:
        return self.n * self.k * (1 if method.startswith("fp8") else 2)


def op_calls(method: str, ws: Weights, x: torch.Tensor, cfg=None) -> list:
    """One zero-argument call per weight copy."""
    if method == "cublas_bf16":
        return [lambda w=w: F.linear(x, w) for w in ws.bf16]
    if method == "gemv_bf16":
        return [lambda w=w: gv.gemv(x, w, config=cfg) for w in ws.bf16]
    if method == "fp8_old":
        return [lambda q=q, s=s: qk.fp8_w8a16_tiled(x, q, s) for q, s in ws.fp8]
    if method == "fp8_new":
        return [lambda q=q, s=s: gv.gemv_fp8(x, q, s, config=cfg) for q, s in ws.fp8]
    if method == "fp8_w8a16":
        return [lambda q=q, s=s: qk.fp8_w8a16(x, q, s) for q, s in ws.fp8]
    if method == "fp8_w8a8":
        return [lambda q=q, s=s: w8a8.gemv_w8a8(x, q, s, config=cfg) for q, s in ws.fp8]
    if method == "fp8_w8a8_preq":
        def call(q, s):
            xq, sx = fp8.quantize_fp8_rows(x, q.dtype)
            return w8a8.gemv_w8a8(xq, q, s, x_scales=sx, config=cfg)
        return [lambda q=q, s=s: call(q, s) for q, s in ws.fp8]
    raise ValueError(method)


def rel_error(method: str, ws: Weights, x: torch.Tensor, cfg=None) -> float:
    out = op_calls(method, ws, x, cfg)[0]().float()
    if method.startswith("fp8_w8a8"):  # against the product with x quantized per row
        xq, sx = fp8.quantize_fp8_rows(x, ws.fp8[0][0].dtype)
        x = xq.float() * sx[:, None]
    ref = x.float() @ ws.reference(method.startswith("fp8")).t()
    return ((out - ref).norm() / ref.norm()).item()


def graph_us(calls: list, replays: int = 15) -> tuple[float, float]:
    """(median, min) microseconds per call: REPS calls rotating over ``calls`` in a graph."""
    return graph_time_us(calls, REPS, replays)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def _compile_tasks(tasks: list) -> int:
    """In a worker process: run each (method, shape, m, cfg) once, so Triton compiles it
    into its disk cache; the timing process then only loads it."""
    weights, failed = {}, 0
    for method, shape, m, cfg in tasks:
        if shape not in weights:
            weights[shape] = Weights(*SHAPES[shape], copies=False)
        ws = weights[shape]
        try:
            op_calls(method, ws, ws.x(m), cfg)[0]()
        except Exception:  # reported again, with its message, when timed
            failed += 1
    torch.cuda.synchronize()
    return failed


def _compile_key(method, shape, m, cfg) -> tuple:
    """What Triton specializes a launch on (besides dtypes): one compile per key."""
    n, k = SHAPES[shape]
    if method.startswith("fp8_w8a8"):
        cfg = cfg or w8a8.w8a8_config(m, n, k)
    elif method not in ("gemv_bf16", "fp8_new"):
        return method, shape, m
    cfg = cfg or gv.gemv_config(m, n, k, method == "fp8_new")
    k_per_split = -(-k // (cfg.block_k * cfg.split_k)) * cfg.block_k
    return method, m, cfg, k % k_per_split == 0, -(-k // k_per_split) > 1


def precompile(tasks: list, jobs: int) -> None:
    t0 = time.perf_counter()
    tasks = list({_compile_key(*t): t for t in tasks}.values())
    chunks = [tasks[i::jobs] for i in range(jobs)]
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        failed = sum(pool.map(_compile_tasks, [c for c in chunks if c]))
    print(f"compiled {len(tasks)} variants in {time.perf_counter() - t0:.0f} s "
          f"({failed} failed)", flush=True)


def time_case(method, ws, m, cfg=None) -> dict:
    try:
        x = ws.x(m)
        err = rel_error(method, ws, x, cfg) if method != "cublas_bf16" else 0.0
        if not err < TOL:
            return {"error": f"relative error {err:.2e}"}
        med, best = graph_us(op_calls(method, ws, x, cfg))
    except Exception as exc:  # a config that does not compile or fit: recorded, not fatal
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    nbytes = ws.nbytes(method)
    return {"us": round(med, 2), "us_min": round(best, 2),
            "TBps": round(nbytes / med / 1e6, 3), "rel_err": float(f"{err:.2e}")}


def sweep(args, result: dict) -> None:
    todo = [(kind, m, shape, with_split(c, *SHAPES[shape]))
            for kind in args.sweep_kinds for m in args.sweep_m
            for c in (w8a8_candidates() if kind == "fp8_w8a8"
                      else candidates(kind == "fp8_new", m))
            for shape in args.sweep_shapes]
    precompile([(kind, shape, m, c) for kind, m, shape, c in todo], args.jobs)
    table = result.setdefault("sweep", {})
    t0 = time.perf_counter()
    for shape in args.sweep_shapes:
        if time.perf_counter() - args.t0 > args.sweep_deadline:
            print(f"sweep: past --sweep-deadline, {shape} and later shapes skipped", flush=True)
            break
        ws = Weights(*SHAPES[shape])
        for kind in args.sweep_kinds:
            for m in args.sweep_m:
                ref = {"fp8_new": "fp8_old", "fp8_w8a8": "fp8_w8a16"}.get(kind, "cublas_bf16")
                table.setdefault(kind, {}).setdefault(str(m), {}).setdefault(shape, {})[
                    f"ref {ref}"] = time_case(ref, ws, m).get("us")
        for kind, m, s, c in todo:
            if s != shape:
                continue
            r = time_case(kind, ws, m, c)
            table.setdefault(kind, {}).setdefault(str(m), {}).setdefault(shape, {})[
                cfg_name(c)] = r.get("us", r.get("error"))
        del ws
        torch.cuda.empty_cache()
        print(f"sweep {shape}: {time.perf_counter() - t0:.0f} s", flush=True)
        save(args, result)
    best = result.setdefault("sweep_best", {})
    for kind, per_m in table.items():
        for m, per_shape in per_m.items():
            for shape, row in per_shape.items():
                ok = {k: v for k, v in row.items() if isinstance(v, float) and k[:4] != "ref "}
                top = sorted(ok, key=ok.get)[:3]
                best.setdefault(kind, {}).setdefault(m, {})[shape] = [(k, ok[k]) for k in top]


def report(args, result: dict) -> None:
    """Every shape, every M, the four ways with the launchers' own configs."""
    rows = result.setdefault("report", {})
    tasks = [(method, shape, m, None) for shape in SHAPES for m in args.m
             for method in ("gemv_bf16", "fp8_new", "fp8_old", "fp8_w8a16", "fp8_w8a8",
                            "fp8_w8a8_preq")]
    precompile(tasks, args.jobs)
    for shape, (n, k) in SHAPES.items():
        ws = Weights(n, k)
        for m in args.m:
            row = {method: time_case(method, ws, m) for method in METHODS}
            for method, cfgfn in (("gemv_bf16", False), ("fp8_new", True)):
                row[method]["config"] = cfg_name(gv.gemv_config(m, n, k, cfgfn))
            row["fp8_w8a8"]["config"] = cfg_name(with_split(w8a8.w8a8_config(m, n, k), n, k))
            rows.setdefault(shape, {})[str(m)] = row
        del ws
        torch.cuda.empty_cache()
        print(f"report {shape} done", flush=True)
        save(args, result)
    result["layer_us"] = {
        str(m): {method: round(sum(rows[s][str(m)][method].get("us", float("nan"))
                                   for s in LAYER), 1) for method in METHODS}
        for m in args.m}


def ceilings(result: dict) -> None:
    """Device-to-device copy (read + write) and a read-only reduction over 2 GiB."""
    a = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    us = graph_us([lambda: b.copy_(a)], replays=5)[0]
    result["copy_TBps"] = round(2 * a.nbytes / us / 1e6, 3)
    us = graph_us([lambda: a.sum(dtype=torch.float32)], replays=5)[0]
    result["read_TBps"] = round(a.nbytes / us / 1e6, 3)


def save(args, result: dict) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def print_table(result: dict) -> None:
    print(f"\n{result['device']}: copy {result['copy_TBps']} TB/s (read+write), "
          f"read-only sum {result['read_TBps']} TB/s")
    print(f"{'shape':12} {'M':>3} " + " ".join(f"{m:>19}" for m in METHODS))
    for shape, per_m in result.get("report", {}).items():
        for m, row in per_m.items():
            cells = [f"{row[x]['us']:7.1f}us {row[x]['TBps']:5.2f}TB/s" if "us" in row[x]
                     else f"{'failed':>19}" for x in METHODS]
            print(f"{shape:12} {m:>3} " + " ".join(cells))
    for m, row in result.get("layer_us", {}).items():
        print(f"layer (qkv+o+gate_up+down) M={m}: " +
              ", ".join(f"{k} {v} us" for k, v in row.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--sweep-shapes", nargs="+", default=SWEEP_SHAPES, choices=list(SHAPES))
    p.add_argument("--sweep-kinds", nargs="+", default=["gemv_bf16", "fp8_new"],
                   choices=["gemv_bf16", "fp8_new", "fp8_w8a8"])
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--sweep-deadline", type=float, default=1e9,
                   help="seconds from the start after which the sweep starts no new shape")
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    t0 = args.t0 = time.perf_counter()
    import triton
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__,
              "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    ceilings(result)
    torch.cuda.empty_cache()
    save(args, result)
    if args.sweep:
        sweep(args, result)
    if not args.no_report:
        report(args, result)
    result["seconds"] = round(time.perf_counter() - t0)
    save(args, result)
    print_table(result)


if __name__ == "__main__":
    main()
