"""Per-step sampler cost on the CPU with one logprobs=-1 (whole vocabulary) request in a batch
of 64: the sampler call plus the host lists the runner makes of its logprobs
(``runner_output.collect``'s part), the other 63 rows without logprobs or with 5; and, for
scale, the same batch with that request asking 5 (``-1 row: no``). Run it once
against each tree (the one on PYTHONPATH is measured) to compare before and after::

    git archive 1a0373b5 tessellm | tar -x -C /tmp/base
    PYTHONPATH=/tmp/base python benchmarks/cpu_sampler_full_logprobs.py   # before
    PYTHONPATH=. python benchmarks/cpu_sampler_full_logprobs.py           # after
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

import tessellm
from tessellm.core import runner_output
from tessellm.core.sampler import Sampler
from tessellm.core.sampling_metadata import build_sampling_batch
from tessellm.core.sampling_params import SamplingParams


def host_lists(result, ks: list) -> list:
    """Each row's top-k (id, logprob) pairs on the host, as ``runner_output.collect`` makes them."""
    if hasattr(runner_output, "_host_logprobs"):  # after: the whole-vocabulary rows on their own
        lp = runner_output._host_logprobs(result)
        return [runner_output._top(lp, r, k) if k is not None else None for r, k in enumerate(ks)]
    lp = (result.sampled_logprob.tolist(), result.sampled_rank.tolist(),  # before: as collect did
          result.topk_ids.tolist() if result.topk_ids is not None else None,
          result.topk_logprobs.tolist() if result.topk_logprobs is not None else None)
    return [(list(zip(lp[2][r][:k], lp[3][r][:k])) if k and lp[2] is not None else [])
            if k is not None else None for r, k in enumerate(ks)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)  # SmolLM2's
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.vocab, generator=g) * 4
    sampler = Sampler(torch.device("cpu"))
    print(f"tessellm from {tessellm.__file__}; batch {args.batch}, vocab {args.vocab}, {args.threads} thread(s)")
    for others, temperature, full in [(o, t, f) for f in (True, False) for o in (None, 5) for t in (0.0, 0.8)]:
        first = args.vocab if full else 5  # -1 as the front end makes it
        params = [SamplingParams(temperature=temperature, logprobs=first)]
        params += [SamplingParams(temperature=temperature, logprobs=others)] * (args.batch - 1)
        rows = [SimpleNamespace(params=p, token_ids=[0, 1], num_prompt_tokens=1) for p in params]
        ks = [p.logprobs for p in params]
        times = []
        for _ in range(args.steps + 2):
            t0 = time.perf_counter()
            batch = build_sampling_batch(rows, lambda i: 0, torch.device("cpu"), args.vocab, ())
            lists = host_lists(sampler(logits, batch), ks)
            times.append(time.perf_counter() - t0)
        assert len(lists[0]) == first and (others is None or len(lists[1]) == others)
        print(f"-1 row: {'yes' if full else 'no ':3}, others logprobs={others!s:>4}, temperature {temperature}: "
              f"median {statistics.median(times[2:]) * 1e3:8.1f} ms/step")


if __name__ == "__main__":
    main()
