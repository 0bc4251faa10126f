"""Fleet prefix-cache hit rate: tessellm's prefix-affinity router vs Serve's default router.

Modes (``--modes``, default all three): ``default`` (Serve's power-of-two-choices router),
``in_flight`` (prefix affinity, load = requests in flight) and ``load`` (prefix affinity, load =
the replicas' reported engine load, ``router.balance: load``, the app's default).

A shared-prefix workload (``--groups`` long system prompts, each followed by many different
short questions, shuffled, sent ``--concurrency`` at a time) runs twice against a fresh
2-replica Ray Serve app on a local Ray cluster: once with ``router.prefix_affinity=true`` and
once with Serve's default power-of-two-choices router. The fleet hit rate is the sum over
replicas of prompt tokens found in the prefix cache divided by prompt tokens looked up, from
each replica's engine counters (``GET /debug/replica``, asked until every replica answered).

Each replica's KV cache is sized to hold about half of the groups' prefixes: with random
routing every replica sees every prefix and they evict each other; with affinity each replica
keeps its own half.

    python benchmarks/ray_serve_prefix_affinity.py     # CPU, bundled SmolLM2; ~2.5 min on 2 cores
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import random
import socket
import sys
import time

import httpx

MODEL = "SmolLM2-135M-Instruct"
TOPICS = ["shipping", "banking", "astronomy", "cooking", "gardening", "chess", "sailing", "tax law",
          "pottery", "beekeeping", "cycling", "photography", "carpentry", "opera", "volcanoes", "knitting"]


def workload(groups: int, per_group: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for g in range(groups):
        topic = TOPICS[g % len(TOPICS)]
        system = (f"System {g}: you are an expert assistant on {topic}. Answer the user's question about "
                  f"{topic} in one short sentence, be precise, avoid jargon, and never mention these "
                  "instructions. ") * 6
        for q in range(per_group):
            prompts.append(f"{system}\nQuestion {q}: what is the most important fact about {topic} "
                           f"number {rng.randint(0, 10**6)}?\nAnswer:")
    rng.shuffle(prompts)
    return prompts


def fleet_stats(url: str, replicas: int) -> dict[str, dict]:
    seen: dict[str, dict] = {}
    for _ in range(100):
        info = httpx.get(f"{url}/debug/replica", timeout=60).json()
        seen[info["replica_id"]] = info["stats"]
        if len(seen) == replicas:
            return seen
    raise RuntimeError(f"only {len(seen)} of {replicas} replicas answered /debug/replica")


def run_mode(url: str, prompts: list[str], concurrency: int, max_tokens: int, replicas: int) -> dict:
    before = fleet_stats(url, replicas)

    def send(prompt: str) -> str:
        r = httpx.post(f"{url}/v1/completions", timeout=600, json={
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        return r.headers["x-tessellm-replica"]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        served = list(pool.map(send, prompts))
    elapsed = time.perf_counter() - t0
    after = fleet_stats(url, replicas)
    hits = sum(after[r]["prefix_cache_hits"] - before[r]["prefix_cache_hits"] for r in after)
    queries = sum(after[r]["prefix_cache_queries"] - before[r]["prefix_cache_queries"] for r in after)
    return {"hit_rate": hits / max(queries, 1), "hits": hits, "queries": queries, "seconds": elapsed,
            "requests_per_replica": sorted(served.count(r) for r in set(served))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--per-group", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument("--num-kv-blocks", type=int, default=96, help="per replica (a prefix is ~15 blocks)")
    p.add_argument("--replica-num-cpus", type=float, default=0.5)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="per replica (default: the engine's); small: requests queue in the engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="default,in_flight,load",
                   help="comma-separated: default (Serve's router), in_flight, load (prefix affinity)")
    args = p.parse_args(argv)
    modes = {"default": ("default (power of two choices)", {"prefix_affinity": False}),
             "in_flight": ("prefix affinity, balance in_flight", {"prefix_affinity": True, "balance": "in_flight"}),
             "load": ("prefix affinity, balance load", {"prefix_affinity": True, "balance": "load"})}
    unknown = [m for m in args.modes.split(",") if m not in modes]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {sorted(modes)}")

    import ray
    from ray import serve

    import tessellm
    from tessellm.entrypoints.ray_serve import build_app

    repo = os.path.dirname(os.path.dirname(os.path.abspath(tessellm.__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (repo, os.environ.get("PYTHONPATH")) if x)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    prompts = workload(args.groups, args.per_group, args.seed)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20)
    results = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, router in (modes[m] for m in args.modes.split(",")):
            engine = {"device": "cpu", "max_model_len": 512, "num_kv_blocks": args.num_kv_blocks}
            if args.max_num_seqs is not None:
                engine["max_num_seqs"] = args.max_num_seqs
            config = {"engine": engine,
                      "server": {"served_model_names": [MODEL]}, "num_replicas": 2,
                      "replica": {"num_cpus": args.replica_num_cpus}, "ingress": {"num_cpus": 0.25},
                      "router": router}
            serve.run(build_app(config), name="bench", route_prefix="/")
            results[name] = run_mode(url, prompts, args.concurrency, args.max_tokens, 2)
            serve.delete("bench")  # fresh replicas (empty caches) for the next mode
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{len(prompts)} requests, {args.groups} shared prefixes, concurrency {args.concurrency}, "
          f"max_tokens {args.max_tokens}, 2 replicas x {args.num_kv_blocks} KV blocks, "
          f"max_num_seqs {args.max_num_seqs or 'default'}")
    print("| router | fleet prefix-cache hit rate | hit / looked-up prompt tokens | requests per replica | wall s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['hit_rate']:.1%} | {r['hits']} / {r['queries']} | "
              f"{r['requests_per_replica']} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
