"""Per-step cost of the sampler (``tessellm.core.sampler``) and of building its inputs
(``sampling_metadata.build_sampling_batch``) at batch 1 and 256, for greedy-only, greedy with
logprobs, and random (temperature + top-k + top-p) batches, with the backend's argmax as the
engine's sampler has it (``--torch-argmax``: torch's). Runs on the cpu here; on a GPU
(``--device cuda``) each call is synchronized, so the figure is the step's sampling latency.

    PYTHONPATH=. python benchmarks/sampler_cost.py --device cpu --vocab 49152 --output-json s.json
    PYTHONPATH=. python benchmarks/sampler_cost.py --device cuda --vocab 128256   # the lead, GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from types import SimpleNamespace

import torch

from tessellm.core.sampler import Sampler
from tessellm.core.sampling_metadata import build_sampling_batch
from tessellm.core.sampling_params import SamplingParams

CONFIGS = {
    "greedy": dict(temperature=0.0),
    "greedy+logprobs5": dict(temperature=0.0, logprobs=5),
    "random top-k/top-p": dict(temperature=0.8, top_k=50, top_p=0.9),
}


def timed(fn, sync, iters: int) -> float:
    """Median microseconds of ``fn()`` over ``iters`` calls (after 3 untimed)."""
    times = []
    for i in range(iters + 3):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def backend_argmax(device: torch.device):
    """The argmax the engine's sampler gets on ``device``: its backend's ``LogitsOps.argmax``
    (cpu: the two-pass one, cuda: Triton), or None (torch's)."""
    from tessellm.backends.registry import get_registry
    from tessellm.backends.spec import LogitsOpsSpec

    registry = get_registry()
    backend = registry.select(device.type)
    ops = registry.provider("tessellm_logits_ops", backend, LogitsOpsSpec(torch.float32))[0]
    return getattr(ops, "argmax", None)


def measure(device: torch.device, vocab: int, batch: int, params: SamplingParams, iters: int,
            argmax=None):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = [SimpleNamespace(params=params, token_ids=[1, 2, 3], num_prompt_tokens=3)
            for _ in range(batch)]
    logits = torch.randn(batch, vocab, device=device)
    sampler = Sampler(device, argmax=argmax)
    build = lambda: build_sampling_batch(rows, lambda i: 5, device, vocab, (0,))  # noqa: E731
    sb = build()
    return {"build_us": round(timed(build, sync, iters), 1),
            "sample_us": round(timed(lambda: sampler(logits, sb), sync, iters), 1)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=49152, help="49152: SmolLM2; 128256: Llama-3")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--torch-argmax", action="store_true",
                   help="torch.argmax instead of the backend's (the engine uses the backend's)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    argmax = None if args.torch_argmax else backend_argmax(device)
    result = {"device": args.device, "vocab": args.vocab, "threads": torch.get_num_threads(),
              "argmax": "torch" if argmax is None else f"{argmax.__module__}.{argmax.__name__}",
              "load_average": os.getloadavg(), "us_per_step": {}}
    for name, kw in CONFIGS.items():
        for b in args.batches:
            r = measure(device, args.vocab, b, SamplingParams(max_tokens=16, **kw), args.iters, argmax)
            result["us_per_step"][f"{name}, batch {b}"] = r
            print(f"{name:>20s} batch {b:>4d}: build {r['build_us']:>9.1f} us, "
                  f"sample {r['sample_us']:>9.1f} us", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
