"""Per-step cost of the sampler on the CPU at batch 1 and 256, this tree's against a baseline
``sampler.py`` (another commit's, loaded from a file) in one process, interleaved: greedy,
greedy with 5 logprobs, top-k, top-p, top-k + top-p, min-p, no filter (temperature 0.8). Also checks that
both give the same tokens to seeded rows (the noise of a seeded row is the same in both).

Logits: real SmolLM2 decode logits when ``--logits FILE`` names a saved ``[rows, 49152]`` tensor
(``--save-logits FILE`` makes one: 8 prompts x 40 sampled tokens through the bundled GGUF), else
synthetic rows (Gaussian, scales 2.5-5, so top-p 0.9 keeps a few to ~2,000 tokens per row).

    git show 851a362:tessellm/core/sampler.py > /tmp/sampler_before.py
    PYTHONPATH=. python benchmarks/cpu_sampler.py --baseline /tmp/sampler_before.py \\
        --logits /tmp/smollm2_logits.pt --output-json sampler.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from tessellm.core.sampler import Sampler
from tessellm.core.sampling_metadata import build_sampling_batch
from tessellm.core.sampling_params import SamplingParams

CONFIGS = {
    "greedy": dict(temperature=0.0),
    "greedy+logprobs5": dict(temperature=0.0, logprobs=5),
    "top-k 50": dict(temperature=0.8, top_k=50),
    "top-p 0.9": dict(temperature=0.8, top_p=0.9),
    "top-k 50 + top-p 0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
    "min-p 0.05": dict(temperature=0.8, min_p=0.05),
    "temperature 0.8": dict(temperature=0.8),
}


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("sampler_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.Sampler


def synthetic_logits(rows: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, vocab, generator=g) * torch.linspace(2.5, 5.0, rows)[torch.randperm(rows, generator=g)][:, None]


def save_real_logits(path: str) -> None:
    """Decode logits of the bundled SmolLM2 GGUF: 8 prompts, 40 sampled tokens each."""
    from tessellm import LLM
    from tessellm.loader.default_model import default_model_path

    llm = LLM(default_model_path(), quantization="gguf", dtype="float32", max_model_len=512,
              num_kv_blocks=128, max_num_seqs=8, enable_prefix_caching=False, enforce_eager=True)
    runner, rows = llm.engine.core.runner, []
    inner = runner.sampler

    class Recording:
        def __getattr__(self, name):
            return getattr(inner, name)

        def __call__(self, logits, batch):
            rows.append(logits.float().clone())
            return inner(logits, batch)

    runner.sampler = Recording()
    prompts = ["The history of the Roman Empire", "Write a poem about the sea.", "def quicksort(arr):",
               "Explain how photosynthesis works", "Once upon a time, in a small village,",
               "The best way to learn a new language is", "Here is a recipe for chocolate cake:",
               "Q: What is the capital of France?\nA:"]
    llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0.8, seed=1, ignore_eos=True), use_tqdm=False)
    torch.save(torch.cat(rows), path)


def batch_for(params: SamplingParams, rows: int, vocab: int):
    reqs = [SimpleNamespace(params=params, token_ids=[1, 2, 3], num_prompt_tokens=3) for _ in range(rows)]
    return build_sampling_batch(reqs, lambda i: i, torch.device("cpu"), vocab, (0,))


def timed_pair(fns: dict, inputs: list, budget_s: float, max_iters: int) -> dict:
    """Median and minimum ms of each ``fns[name](x)``, alternating names, cycling ``inputs``,
    after one untimed call each; stops after ``max_iters`` rounds or ``budget_s`` seconds. On a
    loaded machine read both: an op over more than 32k values opens an OpenMP region, which
    waits for a descheduled thread (a few ms) at random."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn(inputs[0])
    start = time.perf_counter()
    for i in range(max_iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            times[name].append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > budget_s and i >= 2:
            break
    out = {name: round(statistics.median(t), 3) for name, t in times.items()}
    out |= {f"{name} min": round(min(t), 3) for name, t in times.items()}
    return out | {"iters": len(times["new"])}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", default=None, help="a sampler.py to compare against (optional)")
    p.add_argument("--logits", default=None, help="a saved [rows, V] float tensor of real logits")
    p.add_argument("--save-logits", default=None, help="capture SmolLM2 decode logits here and exit")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--budget-s", type=float, default=10.0, help="per config and batch")
    p.add_argument("--max-iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.save_logits:
        save_real_logits(args.save_logits)
        return 0
    logits = torch.load(args.logits) if args.logits else synthetic_logits(max(args.batches) + 64, args.vocab)
    vocab = logits.shape[-1]
    samplers = {"new": Sampler(torch.device("cpu"))}
    if args.baseline:
        samplers["old"] = load_baseline(args.baseline)(torch.device("cpu"))
    result = {"logits": args.logits or "synthetic", "threads": args.threads, "vocab": vocab,
              "load_average_start": os.getloadavg(), "ms_per_step": {}, "seeded_tokens_equal": {}}
    for name in args.configs:
        kw = CONFIGS[name]
        for b in args.batches:
            sb = batch_for(SamplingParams(max_tokens=16, **kw), b, vocab)
            inputs = [logits[i:i + b].contiguous() for i in range(0, len(logits) - b + 1, max(b, 1))][:16]
            fns = {n: (lambda x, s=s: s(x, sb)) for n, s in samplers.items()}
            r = timed_pair(fns, inputs, args.budget_s, args.max_iters)
            if "old" in samplers and kw["temperature"] > 0:
                seeded = batch_for(SamplingParams(max_tokens=16, seed=7, **kw), b, vocab)
                same = torch.equal(samplers["old"](inputs[0], seeded).token_ids,
                                   samplers["new"](inputs[0], seeded).token_ids)
                result["seeded_tokens_equal"][f"{name}, batch {b}"] = same
            result["ms_per_step"][f"{name}, batch {b}"] = r
            print(f"{name:>22s} batch {b:>4d}: " + ", ".join(f"{k} {v}" for k, v in r.items()), flush=True)
    result["load_average_end"] = os.getloadavg()
    print("seeded tokens equal:", result["seeded_tokens_equal"], "load", result["load_average_start"],
          result["load_average_end"])
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
