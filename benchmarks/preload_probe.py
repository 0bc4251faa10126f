"""What an engine start still imports after the forkserver's preload (distributed/spawn.py
``_PRELOAD``), and how long a start from a warm forkserver takes.

    python benchmarks/preload_probe.py --device cuda [--tp 2]

1. In this process (one device, the engine in-process, as a forked worker would run it): the
   modules imported after ``_PRELOAD``'s, by package, and their import time in a fresh
   interpreter after the preload, with whether importing them initialized CUDA (a module
   that does must not join the preload).
2. ``LLM(tensor_parallel_size=tp)`` started three times: the first start includes the
   forkserver's own (its preload); the others are forks of a warm one.
A tiny random Llama (tests/conftest.py's config) is written to a temporary folder.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _tiny_llama(path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import _tiny_configs

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_tiny_configs()["llama"], dtype=torch.float32).save_pretrained(path)


def _new_modules(model: str, device: str) -> list[str]:
    code = f"""
import importlib, json, sys
from tessellm.distributed.spawn import _PRELOAD
for m in _PRELOAD:
    try:
        importlib.import_module(m)
    except ImportError:
        pass
before = set(sys.modules)
from tessellm import LLM, SamplingParams
with LLM({model!r}, device={device!r}, num_kv_blocks=64, seed=0) as llm:
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
print("MODULES", json.dumps(sorted(set(sys.modules) - before)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("MODULES ")][-1]
    return json.loads(line[len("MODULES "):])


def _import_cost(modules: list[str]) -> dict:
    code = f"""
import importlib, json, sys, time
from tessellm.distributed.spawn import _PRELOAD
for m in _PRELOAD:
    try:
        importlib.import_module(m)
    except ImportError:
        pass
cost = {{}}
for m in {modules!r}:
    t = time.perf_counter()
    try:
        importlib.import_module(m)
    except Exception as exc:
        cost[m] = repr(exc)
        continue
    cost[m] = round(time.perf_counter() - t, 4)
import torch
print("COST", json.dumps({{"cost": cost, "cuda_initialized": torch.cuda.is_initialized()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("COST ")][-1]
    return json.loads(line[len("COST "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args()
    model = os.path.join(tempfile.mkdtemp(prefix="preload-probe-"), "llama")
    _tiny_llama(model)

    new = _new_modules(model, args.device)
    packages = collections.Counter(m.split(".")[0] for m in new)
    print(f"modules imported after the preload: {len(new)}; by package: {dict(packages.most_common())}")
    # Top-level candidates: the first-imported module of each package subtree is enough to time.
    roots = sorted({m for m in new if not any(m.startswith(o + ".") for o in new if o != m)})
    result = _import_cost(roots)
    slow = sorted(((v, k) for k, v in result["cost"].items() if isinstance(v, float)), reverse=True)
    print(f"import time after the preload, the costliest: {[(k, v) for v, k in slow[:15]]}")
    print(f"total {sum(v for v, _ in slow):.2f} s; CUDA initialized by these imports: "
          f"{result['cuda_initialized']}")
    failed = {k: v for k, v in result["cost"].items() if not isinstance(v, float)}
    if failed:
        print(f"failed to import alone: {failed}")

    from tessellm import LLM

    times = []
    for _ in range(3):
        t = time.perf_counter()
        with LLM(model, device=args.device, num_kv_blocks=64, seed=0, tensor_parallel_size=args.tp):
            times.append(round(time.perf_counter() - t, 2))
    where = ("the first with the forkserver's" if args.tp > 1
             else "in this process, nothing forked")
    print(f"LLM(tensor_parallel_size={args.tp}) starts ({where}): {times}")


if __name__ == "__main__":
    main()
