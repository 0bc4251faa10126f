"""Time to first token of a prompt whose prefix a recurrent-state model has cached
(core/state_prefix.py), against the same prompt with prefix caching off: random weights, token
ids fed, one GPU (the models of ``recurrent_state_graphs.py``).

Per model and setting an engine starts with the serving warm-up (``kernel_warmup=True``, as
``tessellm serve`` has: every kernel variant a request can meet runs once before ready). Then
``--trials`` rounds, each with fresh token ids: prompt A (``--input-len`` tokens) is prefilled
and answered with one token, then prompt B = A + ``--suffix`` tokens is sent and its first token
timed (``llm.generate``, between device syncs). With prefix caching on, B starts from the state
snapshot after A's last full block and computes the rest in one step, saving its state after
its own last full block inside that step (``state_saves_within``; before session 19: two steps,
up to that block, then the tail); off, it is computed whole.

The first round is the cold one (the first restore, the first prefill of B's chunk sizes since
start); ``ttft_ms`` is the median of the others (the steady state), ``cold_ms`` the first.
``steps`` / ``step_ms``: B's engine steps in the last round and their host wall times.
``--profile DIR`` writes, per model and setting, torch profiler tables (device and host time
per op) of B's last round. One JSON line per model::

    python benchmarks/mprefix_ttft.py --models granite4h --input-len 3000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recurrent_state_graphs import write_config  # noqa: E402


def prompts(input_len: int, suffix: int, seed: int) -> tuple[list[int], list[int]]:
    """A and B = A + suffix, token ids in [10, 1010), different for each seed."""
    a = [(7 * j + 13 * seed) % 1000 + 10 for j in range(input_len)]
    return a, a + [(11 * j + 17 * seed) % 1000 + 10 for j in range(suffix)]


def ttft(path: str, input_len: int, suffix: int, cache: bool, dtype: str, device: str,
         trials: int, warmup: bool, profile: str = "") -> dict:
    import torch

    from tessellm import LLM, SamplingParams

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times, cached = [], []
    with LLM(path, load_format="dummy", dtype=dtype, max_model_len=input_len + suffix + 64,
             max_num_seqs=8, enable_prefix_caching=cache, device=device,
             kernel_warmup=warmup) as llm:
        core = llm.engine.core
        core_step, step_ms = core.step, []

        def timed_step(*args, **kwargs):  # B's engine steps: how many, and their host time
            t0 = time.perf_counter()
            try:
                return core_step(*args, **kwargs)
            finally:
                step_ms.append(round((time.perf_counter() - t0) * 1e3, 2))

        for trial in range(trials):
            a, b = prompts(input_len, suffix, trial)
            llm.generate([{"prompt_token_ids": a}], one, use_tqdm=False)
            sync()
            last = trial == trials - 1
            step_ms.clear()
            core.step = timed_step
            prof = _profiler(device) if (last and profile) else None
            t = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": b}], one, use_tqdm=False)[0]
            sync()
            times.append((time.perf_counter() - t) * 1e3)
            if prof is not None:
                prof.__exit__(None, None, None)
                _write_tables(prof, profile)
            del core.step  # the class's step again
            cached.append(out.num_cached_tokens)
        states = core.kv.states
        warm = times[1:] or times
        return {"ttft_ms": round(statistics.median(warm), 1), "cold_ms": round(times[0], 1),
                "trials_ms": [round(x, 1) for x in times], "cached_tokens": cached[-1],
                "steps": len(step_ms), "step_ms": list(step_ms),
                "snapshots": states.num_slots if states is not None else 0}


def _profiler(device: str):
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=acts)
    prof.__enter__()
    return prof


def _write_tables(prof, path: str) -> None:
    avg = prof.key_averages()
    with open(path, "w") as f:
        for key in ("self_device_time_total", "self_cpu_time_total", "cpu_time_total"):
            try:
                f.write(f"== sorted by {key}\n{avg.table(sort_by=key, row_limit=30)}\n")
            except (AttributeError, KeyError, ValueError) as exc:  # a key this torch lacks
                f.write(f"== {key}: {exc}\n")


def check_length(path: str, need: int) -> None:
    """The prompts (and 64 spare positions) fit the written model's length, or a clear exit."""
    from transformers import AutoConfig

    from tessellm.config import resolve_max_model_len

    limit = resolve_max_model_len(None, AutoConfig.from_pretrained(path))
    if need > limit:
        raise SystemExit(f"{os.path.basename(path)}: --input-len + --suffix + 64 = {need} exceeds its "
                         f"{limit} positions; use a shorter --input-len.")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["granite4h"])
    p.add_argument("--input-len", type=int, default=3000)  # granite4h: 4096 positions
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--layers", type=int, default=0, help="0: the model's own layer count")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", help="cuda, or cpu (a small --layers)")
    p.add_argument("--trials", type=int, default=4, help="rounds of A then B; the first is cold")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the serving warm-up (kernel_warmup): first-compile costs show")
    p.add_argument("--profile", default="", help="a directory for torch profiler tables of B")
    args = p.parse_args()
    import torch
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory() as root:
        for name in args.models:
            path = write_config(name, args.layers, root)
            check_length(path, args.input_len + args.suffix + 64)
            where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
            row = {"model": name, "device": where,
                   "layers": AutoConfig.from_pretrained(path).num_hidden_layers,
                   "input_len": args.input_len, "suffix": args.suffix,
                   "warmup": not args.no_warmup}
            for cache in (True, False):
                key = "cache_on" if cache else "cache_off"
                prof = os.path.join(args.profile, f"mprefix_{name}_{key}.txt") if args.profile else ""
                row[key] = ttft(path, args.input_len, args.suffix, cache, args.dtype, args.device,
                                max(1, args.trials), not args.no_warmup, prof)
            row["speedup"] = round(row["cache_off"]["ttft_ms"] / row["cache_on"]["ttft_ms"], 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
