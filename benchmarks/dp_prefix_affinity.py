"""Fleet prefix-cache hit rate of ``LLM(data_parallel_size=2)``: the prefix-cache-aware
balancer (the default) against the same balancer with affinity off (load alone).

A shared-prefix workload (``--groups`` system prompts of ``--prefix-len`` tokens, each
followed by many different short questions, shuffled) is sent in waves of ``--concurrency`` prompts (each wave one
``generate`` call, so the cores' reports of what their caches hold come back between waves).
The fleet hit rate is the sum over cores of prompt tokens found in the prefix cache divided by
prompt tokens looked up, from each core's own counters. Each core's KV cache holds about half
of the groups' prefixes: without affinity each core sees every prefix and they evict each
other; with it each keeps its own half.

    python benchmarks/dp_prefix_affinity.py            # CPU, bundled SmolLM2; ~2 min on 2 cores

With ``--kv-offloading-size GiB`` each core has a host KV tier too, and a third mode runs: the
balancer blind to the host tier (its reports' host lists dropped at the front end: a prefix
evicted to the tier counts as gone, as before the tier was reported). The hit rate then counts
host-tier hits too (loaded back, not recomputed), and the recomputed prompt tokens are shown.
    bash benchmarks/dpprefix_device.sh                 # 2 GPUs, Llama-3.1-8B shapes, dummy weights
"""

from __future__ import annotations

import argparse
import random
import sys
import time

def workload(groups: int, per_group: int, prefix_len: int, seed: int) -> list[dict]:
    """Token-id prompts (any model, a tokenizer or not): per group a ``prefix_len``-token
    system prompt, then per request a different 12-token question; shuffled."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(groups):
        system = [rng.randrange(100, 10_000) for _ in range(prefix_len)]
        for _ in range(per_group):
            prompts.append({"prompt_token_ids": system + [rng.randrange(100, 10_000) for _ in range(12)]})
    rng.shuffle(prompts)
    return prompts


def run_mode(args, prompts: list[dict], affinity: bool, host_aware: bool = True) -> dict:
    from tessellm import LLM, SamplingParams

    kw = dict(device=args.device, max_model_len=args.max_model_len, data_parallel_size=2)
    if args.kv_offloading_size:
        kw["kv_offloading_size"] = args.kv_offloading_size
    if args.num_kv_blocks:
        kw["num_kv_blocks"] = args.num_kv_blocks
    if args.model:
        kw["model"] = args.model
    if args.load_format:
        kw["load_format"] = args.load_format
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    with LLM(**kw) as llm:
        llm.engine.cores.balancer.affinity = affinity
        if not host_aware:  # the front end drops the host tier's reports (a measurement only)
            view = llm.engine.cores.balancer.view
            apply = view.apply
            view.apply = lambda core, ev: apply(core, ev and {k: v for k, v in ev.items()
                                                               if not k.startswith("host_")})
        t0 = time.perf_counter()
        for i in range(0, len(prompts), args.concurrency):
            llm.generate(prompts[i:i + args.concurrency], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        stats = llm.engine.core_stats()
        sent = llm.engine.requests_sent()
    hits = sum(s["prefix_cache_hits"] for s in stats)
    host = sum((s.get("kv_offload") or {}).get("hits", 0) for s in stats)
    queries = sum(s["prefix_cache_queries"] for s in stats)
    return {"hit_rate": (hits + host) / max(queries, 1), "hits": hits, "host": host, "queries": queries,
            "seconds": elapsed, "sent": sent}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2")
    p.add_argument("--load-format", default=None, help="e.g. dummy (a config-only model directory)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prefix-len", type=int, default=240, help="tokens of each shared system prompt")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--per-group", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--num-kv-blocks", type=int, default=72,
                   help="per core (a prefix is ~15 blocks); 0: sized from free memory")
    p.add_argument("--kv-offloading-size", type=float, default=0,
                   help="GiB of host KV tier per core (0: none); adds the host-blind mode")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    prompts = workload(args.groups, args.per_group, args.prefix_len, args.seed)
    modes = [("load only (affinity off)", False, True)]
    if args.kv_offloading_size:
        modes.append(("prefix-cache aware, blind to the host tier", True, False))
    modes.append(("prefix-cache aware (default)", True, True))
    results = {name: run_mode(args, prompts, affinity, aware) for name, affinity, aware in modes}
    tier = f", host tier {args.kv_offloading_size} GiB a core" if args.kv_offloading_size else ""
    print(f"{len(prompts)} requests, {args.groups} shared prefixes, waves of {args.concurrency}, "
          f"-dp 2 x {args.num_kv_blocks or 'auto'} KV blocks{tier}, {args.device}")
    print("| balancer | fleet prefix-cache hit rate | device (+ host-tier) hit / looked-up prompt tokens "
          "| recomputed prompt tokens | requests per core | wall s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        host = f" + {r['host']}" if args.kv_offloading_size else ""
        print(f"| {name} | {r['hit_rate']:.1%} | {r['hits']}{host} / {r['queries']} | "
              f"{r['queries'] - r['hits'] - r['host']} | {r['sent']} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
