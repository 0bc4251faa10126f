"""n-gram speculation on the CPU: the bundled SmolLM2 (real weights, fp32) on copy-heavy prompts.

The prompts are ``benchmarks/spec_decode.py``'s ("repeat / edit this passage", 8 chat prompts),
batch 1, greedy, EOS ignored. One plain engine and one engine per k are loaded side by side and
run in interleaved rounds (plain, k=3, k=5, plain, ...), so a change of machine load hits all of
them alike; the figure is the median ms per output token (TTFT excluded) over rounds x prompts.

Usage: python benchmarks/spec_cpu.py --out DIR [--rounds 2] [--tokens 96] [--ks 3 5]
Writes DIR/spec_cpu.json (after every round, so a time box keeps what was measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from spec_decode import PASSAGES, TASKS, b1, spec_stats  # noqa: E402

from tessellm import LLM  # noqa: E402
from tessellm.entrypoints.chat_utils import render_chat  # noqa: E402


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/tessellm-out"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--ks", type=int, nargs="+", default=[3, 5])
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    common = dict(device="cpu", dtype="float32", max_model_len=1024, enable_prefix_caching=False)
    engines = {"plain": LLM(**common)}
    tok = engines["plain"].get_tokenizer()
    prompts = [[int(t) for t in render_chat(tok, [{"role": "user", "content": task.format(p)}], True, None)]
               for task in TASKS for p in PASSAGES]
    for k in args.ks:
        engines[f"ngram_k{k}"] = LLM(**common, speculative_config={"method": "ngram",
                                                                   "num_speculative_tokens": k})
    tpots: dict[str, list[float]] = {name: [] for name in engines}
    outs: dict[str, list[list[int]]] = {}
    result = {"model": "SmolLM2-135M-Instruct (bundled GGUF), fp32, cpu backend",
              "workload": f"{len(prompts)} copy / light-edit chat prompts, batch 1, greedy, "
                          f"{args.tokens} output tokens (EOS ignored)",
              "prompt_tokens": [len(x) for x in prompts], "threads": os.cpu_count(),
              "load_avg_start": _loadavg(), "rounds": []}
    for r in range(args.rounds):
        t0 = time.perf_counter()
        medians = {}
        for name, llm in engines.items():
            got, tokens = b1(llm, prompts, args.tokens)
            tpots[name] += got
            outs.setdefault(name, tokens)
            medians[name] = round(statistics.median(got) * 1e3, 2)
        result["rounds"].append({"seconds": round(time.perf_counter() - t0, 1), "load_avg": _loadavg(),
                                 "ms_per_token": medians})
        plain = statistics.median(tpots["plain"]) * 1e3
        result["plain_ms_per_token"] = round(plain, 2)
        for name, llm in engines.items():
            if name == "plain":
                continue
            ms = statistics.median(tpots[name]) * 1e3
            stats = spec_stats(llm)
            result[name] = {"ms_per_token": round(ms, 2), "speedup": round(plain / ms, 3),
                            "tokens_equal_plain": sum(a == b for a, b in zip(outs[name], outs["plain"])),
                            **stats}
        with open(os.path.join(args.out, "spec_cpu.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result, indent=2), flush=True)
    for llm in engines.values():
        llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
