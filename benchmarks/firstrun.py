"""What the first big batch of a process pays that the second does not (F, one GPU).

One process: ``LLM(...)`` (kernel warm-up on or off), the bench's tiny warm-up (2 prompts of 16
tokens), then workload F (256 x 512 in / 256 out, greedy, EOS ignored) ``--runs`` times, each with
its own random tokens and the same lengths, so every run schedules the same steps. For each run:

* wall time and tok/s;
* Triton JIT compilations in it (the hook ``tessellm.metrics.compile_counter`` counts; loads
  from ``TRITON_CACHE_DIR`` count too), the seconds between Triton's pre- and post-compile hooks
  and the kernels' names;
* CUDA graphs captured in it, graphs replayed for the first time (their first replay uploads the
  graph) and the host time those first replays took;
* the caching allocator: reserved bytes before / after, new segments, device mallocs, alloc
  retries (a retry frees the cache and synchronizes), the run's peak;
* per step (submit to submit; the schedule is the same every run): where run 1 lost time
  against the last run, by step kind (mixed = prompt tokens in it, decode = one token a row);
* with ``--profile-s S``: a torch.profiler table (CPU + CUDA runtime) of the run's first S
  seconds, top host ops by self time and the CUDA runtime / driver calls.

    python3 benchmarks/firstrun.py --model benchmarks/model-configs/llama-3.1-8b --runs 2 \
        [--kernel-warmup] [--profile-s 2] [--output-json out.json]

Output: a few lines per run (``RUN i: ...``), then ``SUMMARY``.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections import defaultdict

import torch

CUDA = torch.cuda.is_available()  # (a CPU dry run prints zeros for the device counters)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Probe:
    """Process-wide counters: Triton compiles (with their time), CUDA graph captures / replays."""

    def __init__(self):
        self.compiles: list = []  # (name, seconds)
        self.captures = 0
        self.capture_s = 0.0
        self.replayed: set = set()
        self.first_replays = 0
        self.first_replay_s = 0.0
        self._start = threading.local()

    def install(self) -> None:
        try:
            from triton import knobs
        except ImportError:
            return
        rt = knobs.runtime
        prev_pre, prev_post = getattr(rt, "jit_cache_hook", None), rt.jit_post_compile_hook

        def pre(*args, **kwargs):
            self._start.t = time.perf_counter()
            return prev_pre(*args, **kwargs) if prev_pre is not None else None

        def post(*args, **kwargs):
            t0 = getattr(self._start, "t", None)
            fn = kwargs.get("fn")
            name = getattr(fn, "name", None) or str(fn)
            self.compiles.append((name.split(".")[-1], time.perf_counter() - t0 if t0 else 0.0))
            return prev_post(*args, **kwargs) if prev_post is not None else None

        rt.jit_cache_hook, rt.jit_post_compile_hook = pre, post
        if not CUDA:
            return
        graph = torch.cuda.CUDAGraph
        capture_end, replay = graph.capture_end, graph.replay
        probe = self

        def capture_end_(g, *a, **k):
            t0 = time.perf_counter()
            out = capture_end(g, *a, **k)
            probe.captures += 1
            probe.capture_s += time.perf_counter() - t0
            return out

        def replay_(g, *a, **k):
            if id(g) in probe.replayed:
                return replay(g, *a, **k)
            t0 = time.perf_counter()
            out = replay(g, *a, **k)
            probe.replayed.add(id(g))
            probe.first_replays += 1
            probe.first_replay_s += time.perf_counter() - t0
            return out

        graph.capture_end, graph.replay = capture_end_, replay_

    def snapshot(self) -> dict:
        stats = torch.cuda.memory_stats() if CUDA else {}
        return {"compiles": len(self.compiles), "compile_s": sum(s for _, s in self.compiles),
                "captures": self.captures, "capture_s": self.capture_s,
                "first_replays": self.first_replays, "first_replay_s": self.first_replay_s,
                "reserved": stats.get("reserved_bytes.all.current", 0),
                "segments": stats.get("segment.all.current", 0),
                "device_allocs": stats.get("num_device_alloc", 0),
                "alloc_retries": stats.get("num_alloc_retries", 0),
                "peak": stats.get("allocated_bytes.all.peak", 0),
                "pinned_segments": _pinned_segments()}


def _pinned_segments() -> int:
    if not CUDA:
        return 0
    try:
        return torch.cuda.host_memory_stats().get("segment.current", 0)
    except Exception:  # (older torch)
        return -1


def _memory_profile(llm) -> str:
    """The worker's KV sizing (``Worker.memory_profile``, in-process executors only): the
    profile step's peak, the graphs' reserve against their pool, the KV blocks it gave."""
    worker = getattr(llm.engine.core.executor, "worker", None)
    mp = getattr(worker, "memory_profile", None)
    if not mp:
        return ""
    gib = 2**30
    return (f"step peak {mp['profile_peak'] / gib:.2f} GiB above the weights, graphs "
            f"reserved {mp['graph_estimate'] / gib:.2f} GiB / pool {mp.get('graph_pool', 0) / gib:.2f}"
            f" GiB, free at sizing {mp['free'] / gib:.2f} of {mp['total'] / gib:.2f} GiB, "
            f"{llm.engine.info.num_kv_blocks} KV blocks")


def _delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a if k not in ("reserved", "peak")}


class StepClock:
    """Wraps the executor's ``submit``: each step's shape, its launch's host time, and when it was
    submitted (submit to submit = the step's share of the run)."""

    def __init__(self, executor):
        self.rows: list = []
        real = executor.submit

        def submit(sched):
            t0 = time.perf_counter()
            out = real(sched)
            counts = sched.num_scheduled_tokens.values()
            prompt = sum(n for n in counts if n > 1)
            self.rows.append((t0, time.perf_counter() - t0, sched.total_num_scheduled_tokens,
                              len(sched.num_scheduled_tokens), prompt))
            return out

        executor.submit = submit

    def take(self) -> list:
        rows, self.rows = self.rows, []
        return rows


def _requests(n, input_len, vocab, seed):
    rng = random.Random(seed)
    return [[rng.randrange(min(1000, vocab // 2), vocab) for _ in range(input_len)] for _ in range(n)]


def run_batch(llm, prompts, params, tag, profile_s: float, clock: StepClock):
    """Add every prompt, step until done (LLM.generate's loop); the profiler, when asked for,
    covers the first ``profile_s`` seconds (stopped between steps)."""
    engine = llm.engine
    prof = None
    if profile_s > 0:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    _sync()
    start = time.perf_counter()
    stopped = None
    if prof is not None:
        prof.__enter__()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, params)
    done = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            done += out.finished
        if prof is not None and time.perf_counter() - start > profile_s:
            prof.__exit__(None, None, None)  # (its table is read after the run)
            stopped, prof = prof, None
    _sync()
    elapsed = time.perf_counter() - start
    if prof is not None:  # the run was shorter than profile_s
        prof.__exit__(None, None, None)
        stopped = prof
    table = profiled_table(stopped) if stopped is not None else None
    assert done == len(prompts), (done, len(prompts))
    return elapsed, clock.take(), table


def profiled_table(prof, rows: int = 10) -> str:
    """Top host ops by self CPU time, then the CUDA runtime / driver calls (count, total ms)."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: -e.self_cpu_time_total)
    lines = ["    top host ops by self CPU ms (count):"]
    for e in events[:rows]:
        lines.append(f"      {e.self_cpu_time_total / 1e3:9.1f}  {e.key[:70]} ({e.count})")
    runtime = [e for e in events if e.key.startswith("cu") and not e.key.startswith("cutlass")]
    lines.append("    CUDA runtime / driver calls by self CPU ms (count):")
    for e in runtime[:rows]:
        lines.append(f"      {e.self_cpu_time_total / 1e3:9.1f}  {e.key[:70]} ({e.count})")
    return "\n".join(lines)


def step_split(rows_a: list, rows_b: list) -> dict:
    """Run a's extra time over run b's per step kind, and its five worst steps."""
    def spans(rows):
        ts = [r[0] for r in rows]
        return [(ts[i + 1] - ts[i]) if i + 1 < len(ts) else None for i in range(len(ts))]

    sa, sb = spans(rows_a), spans(rows_b)
    by_kind = defaultdict(lambda: [0, 0.0, 0.0])
    worst = []
    for i in range(min(len(rows_a), len(rows_b)) - 1):
        ra, rb = rows_a[i], rows_b[i]
        kind = "mixed" if ra[4] else "decode"
        k = by_kind[kind]
        k[0] += 1
        k[1] += sa[i] - sb[i]
        k[2] += ra[1] - rb[1]
        worst.append((sa[i] - sb[i], i, kind, ra[2], ra[3], ra[1] - rb[1]))
    worst.sort(reverse=True)
    return {"steps": (len(rows_a), len(rows_b)),
            "same_schedule": [r[2:] for r in rows_a] == [r[2:] for r in rows_b],
            "extra_s_by_kind": {k: {"steps": v[0], "extra_s": round(v[1], 3),
                                    "extra_launch_s": round(v[2], 3)} for k, v in by_kind.items()},
            "worst": [{"step": i, "kind": kind, "tokens": tok, "rows": nrows,
                       "extra_ms": round(d * 1e3, 1), "extra_launch_ms": round(dl * 1e3, 1)}
                      for d, i, kind, tok, nrows, dl in worst[:5]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/model-configs/llama-3.1-8b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--kernel-warmup", action="store_true", help="the serving warm-up at start")
    ap.add_argument("--profile-s", type=float, default=0.0,
                    help="profile each run's first S seconds (CPU + CUDA runtime); 0: off")
    ap.add_argument("--label", default="")
    ap.add_argument("--output-json", default=None)
    args, extra = ap.parse_known_args()
    engine_kwargs = {}
    for item in extra:  # --engine key=value (ints / floats / bools parsed)
        k, _, v = item.lstrip("-").partition("=")
        engine_kwargs[k.replace("-", "_")] = json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v

    probe = Probe()
    probe.install()
    from tessellm import LLM, SamplingParams
    from tessellm.metrics.compile_counter import COUNTER
    from tessellm.sampling_params import RequestOutputKind  # FINAL_ONLY: steps build no per-step outputs

    t0 = time.perf_counter()
    s0 = probe.snapshot()
    llm = LLM(model=args.model, load_format=args.load_format, max_model_len=args.max_model_len,
              kernel_warmup=args.kernel_warmup or None, **engine_kwargs)
    start_s = time.perf_counter() - t0
    s1 = probe.snapshot()
    report = llm.engine.warmup
    clock = StepClock(llm.engine.core.executor)
    vocab = llm.engine.info.vocab_size
    lbl = args.label or ("kernel-warmup" if args.kernel_warmup else "no-kernel-warmup")
    print(f"[{lbl}] start {start_s:.1f} s: {s1['compiles'] - s0['compiles']} Triton compiles "
          f"({s1['compile_s'] - s0['compile_s']:.1f} s), {s1['captures']} graphs captured, "
          f"reserved {s1['reserved'] / 2**30:.2f} GiB in {s1['segments']} segments; warm-up: "
          + (f"{report.requests} requests, {report.steps} steps, {report.seconds:.1f} s" if report else "off"))
    memory = _memory_profile(llm)
    if memory:
        print(f"[{lbl}] memory profile: " + memory)
    # the bench's tiny warm-up: 2 prompts of 16 tokens, 4 tokens out
    tiny = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0,
                          output_kind=RequestOutputKind.FINAL_ONLY)
    if args.profile_s > 0:  # CUPTI's one-time start-up stays out of run 1
        run_batch(llm, _requests(2, 16, vocab, 1), tiny, "tiny-prof", 0.5, clock)
    s2 = probe.snapshot()
    run_batch(llm, _requests(2, 16, vocab, 2), tiny, "tiny", 0.0, clock)
    s3 = probe.snapshot()
    print(f"[{lbl}] tiny warm-up: {s3['compiles'] - s2['compiles']} compiles "
          f"({s3['compile_s'] - s2['compile_s']:.2f} s)")
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    runs = []
    for r in range(args.runs):
        prompts = _requests(args.num_prompts, args.input_len, vocab, 100 + r)
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        before = probe.snapshot()
        n0 = len(probe.compiles)
        elapsed, steps, table = run_batch(llm, prompts, params, f"run{r}", args.profile_s, clock)
        after = probe.snapshot()
        d = _delta(before, after)
        names = defaultdict(lambda: [0, 0.0])
        for name, s in probe.compiles[n0:]:
            names[name][0] += 1
            names[name][1] += s
        top = sorted(names.items(), key=lambda kv: -kv[1][1])
        tok_s = args.num_prompts * args.output_len / elapsed
        runs.append({"run": r + 1, "elapsed_s": round(elapsed, 3), "output_tok_s": round(tok_s, 1),
                     **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()},
                     "reserved_before_gib": round(before["reserved"] / 2**30, 3),
                     "reserved_after_gib": round(after["reserved"] / 2**30, 3),
                     "peak_gib": round(after["peak"] / 2**30, 3),
                     "compiled": {n: [c, round(s, 3)] for n, (c, s) in top},
                     "steps": steps, "profile": table})
        print(f"[{lbl}] RUN {r + 1}: {elapsed:.3f} s ({tok_s:,.0f} tok/s), {len(steps)} steps | "
              f"Triton {d['compiles']} compiles ({d['compile_s']:.2f} s in the hooks) | graphs "
              f"{d['captures']} captured, {d['first_replays']} first replays "
              f"({d['first_replay_s'] * 1e3:.1f} ms host) | reserved {before['reserved'] / 2**30:.2f}"
              f" -> {after['reserved'] / 2**30:.2f} GiB, segments +{d['segments']}, device mallocs "
              f"+{d['device_allocs']}, alloc retries +{d['alloc_retries']}, pinned segments "
              f"+{d['pinned_segments']}, peak {after['peak'] / 2**30:.2f} GiB | launch host "
              f"{sum(s[1] for s in steps):.2f} s")
        if CUDA:
            free, total = torch.cuda.mem_get_info()
            print(f"[{lbl}]   device memory after run {r + 1}: {(total - free) / 2**30:.2f} of "
                  f"{total / 2**30:.2f} GiB used (the process and others)")
        if top:
            print(f"[{lbl}]   compiled: " + ", ".join(f"{n} x{c} {s:.2f}s" for n, (c, s) in top[:8]))
        if table:
            print(f"[{lbl}]   profile of the first {args.profile_s:g} s:\n{table}")
    if len(runs) >= 2:
        split = step_split(runs[0]["steps"], runs[-1]["steps"])
        kinds = ", ".join(f"{k} {v['steps']} steps {v['extra_s']:+.3f} s (launch {v['extra_launch_s']:+.3f})"
                          for k, v in split["extra_s_by_kind"].items())
        print(f"[{lbl}] run 1 vs run {len(runs)} by step (same schedule: {split['same_schedule']}): {kinds}")
        print(f"[{lbl}]   worst steps: " + "; ".join(
            f"#{w['step']} {w['kind']} {w['tokens']} tok/{w['rows']} rows {w['extra_ms']:+} ms "
            f"(launch {w['extra_launch_ms']:+})" for w in split["worst"]))
        print(f"[{lbl}] SUMMARY run 1 {runs[0]['elapsed_s']:.3f} s, run {len(runs)} "
              f"{runs[-1]['elapsed_s']:.3f} s: first/last {runs[0]['elapsed_s'] / runs[-1]['elapsed_s']:.3f}x; "
              f"run 1 compiled {runs[0]['compiles']} ({runs[0]['compile_s']:.2f} s), segments "
              f"+{runs[0]['segments']}, retries +{runs[0]['alloc_retries']}; after ready "
              f"{COUNTER.after_ready} Triton compiles in all")
    else:
        split = None
    if args.output_json:
        for r in runs:
            r["steps"] = [[round(x, 6) if isinstance(x, float) else x for x in s] for s in r["steps"]]
        with open(args.output_json, "w") as f:
            json.dump({"label": lbl, "start_s": start_s, "runs": runs, "split": split,
                       "warmup": report and vars(report)}, f, indent=1)
    llm.shutdown()


if __name__ == "__main__":
    main()
