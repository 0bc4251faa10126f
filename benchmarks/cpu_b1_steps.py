"""Batch-1 decode step times of the bundled SmolLM2 Q4_1 GGUF through ``quantization="gguf"``,
eager against compiled (``TESSELLM_CPU_COMPILE=1``), in one process, interleaved rounds.

Each engine step is timed on its own and the minimum and 20th percentile over all timed decode
steps are reported beside the median: on a shared machine the low percentiles are the figures
that survive other jobs' load (run with ``--threads 1`` then, so OpenMP threads do not spin
waiting for a descheduled partner). Also prints the greedy tokens' agreement.

    PYTHONPATH=. TESSELLM_PLUGINS=cpu python benchmarks/cpu_b1_steps.py --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from cpu_b1 import prompt_ids


def build(path: str, compiled: bool):
    from tessellm import LLM

    os.environ["TESSELLM_CPU_COMPILE"] = "1" if compiled else "0"
    return LLM(path, quantization="gguf", dtype="float32", max_model_len=512, num_kv_blocks=64,
               max_num_seqs=4, enable_prefix_caching=False, enforce_eager=not compiled)


def run(llm, ids: list[int], n: int, tag: str):
    """(ms of each decode step, greedy tokens) of one request."""
    from tessellm import SamplingParams
    from tessellm.sampling_params import RequestOutputKind

    eng = llm.engine  # final-only, as LLM.generate runs: the steps time no per-step outputs
    eng.add_request(tag, {"prompt_token_ids": ids},
                    SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                   output_kind=RequestOutputKind.FINAL_ONLY))
    times, tokens = [], []
    while eng.has_unfinished_requests():
        start = time.perf_counter()
        outs = eng.step()
        times.append((time.perf_counter() - start) * 1e3)
        tokens = next((list(o.outputs[0].token_ids) for o in outs), tokens)
    return times[1:], tokens  # the first step is the prefill


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-len", type=int, default=33)
    args = p.parse_args()
    import torch

    from tessellm.loader.default_model import default_model_path

    torch.set_num_threads(args.threads)
    engines = {}
    for name in ("eager", "compiled"):
        start = time.perf_counter()
        engines[name] = build(default_model_path(), name == "compiled")
        print(f"{name}: built in {time.perf_counter() - start:.0f} s", flush=True)
    steps, tokens = {n: [] for n in engines}, {}
    ids = prompt_ids(128, 49152, 0)
    for r in range(args.rounds + 1):  # round 0 warms up, untimed
        for name, llm in engines.items():
            times, tokens[name] = run(llm, ids, args.output_len, f"{name}-{r}")
            steps[name] += times if r else []
        print(f"round {r}: load average {os.getloadavg()[0]:.1f}", flush=True)
    for name, ts in steps.items():
        ts.sort()
        print(f"{name}: decode step min {ts[0]:.2f}, p20 {ts[len(ts) // 5]:.2f}, "
              f"median {statistics.median(ts):.2f} ms ({len(ts)} steps, {args.threads} threads)")
    same = next((i for i, (a, b) in enumerate(zip(tokens["eager"], tokens["compiled"])) if a != b),
                len(tokens["eager"]))
    print(f"compiled vs eager: {same}/{len(tokens['eager'])} leading greedy tokens equal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
