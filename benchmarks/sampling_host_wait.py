"""Does building and launching a step's sampling make the host wait for the GPU?

A mixed batch (``--batch`` rows cycling through: greedy, temperature + top-k/top-p + seed,
min-p + logprobs, penalties, logit bias, bad words + min_tokens, allowed_token_ids) over a
``--vocab`` vocabulary. Each iteration queues ``--busy-ms`` of GPU work (``torch.cuda._sleep``:
the step's forward still running), then times on the host ``build_sampling_batch`` and the
sampler's call, which only queue work: a blocking upload or read in them makes the host wait
for the queued work, and the time jumps to about ``--busy-ms``. Also counts, once, the syncs
``torch.cuda.set_sync_debug_mode("warn")`` reports in the same calls.

Compare a tree with a baseline on the same machine (the script uses only APIs both have):

    PYTHONPATH=. python benchmarks/sampling_host_wait.py
    PYTHONPATH=../baseline python benchmarks/sampling_host_wait.py

On the CPU (no queue, nothing to wait for) it runs too, timing the host work alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch


def _rows(batch: int, vocab: int):
    from tessellm.core.input_batch import RunnerRequest
    from tessellm.core.sampling_params import SamplingParams

    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.8, top_k=50, top_p=0.9, seed=1),
        dict(temperature=1.0, min_p=0.05, logprobs=5),
        dict(temperature=0.7, repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.2),
        dict(temperature=0.7, logit_bias={11: 2.0, 12: -2.0}),
        dict(temperature=0.7, bad_words_token_ids=[[40, 41]], min_tokens=64, max_tokens=128),
        dict(temperature=0.7, allowed_token_ids=list(range(100, 1100))),
    ]
    prompt = [(37 * j) % (vocab - 10) + 5 for j in range(512)]
    output = [(91 * j) % (vocab - 10) + 5 for j in range(32)]
    return [RunnerRequest(f"r{i}", prompt + output, len(prompt), SamplingParams(**kinds[i % len(kinds)]),
                          [], len(prompt) + len(output) - 1) for i in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--busy-ms", type=float, default=20.0)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from tessellm.core.sampler import Sampler
    from tessellm.core.sampling_metadata import build_sampling_batch

    device = torch.device(args.device)
    rows = _rows(args.batch, args.vocab)
    logits = torch.randn(args.batch, args.vocab, device=device)
    sampler = Sampler(device, seed=0)
    cuda = device.type == "cuda"
    cycles = 0
    if cuda:  # cycles per ms of torch.cuda._sleep, measured once
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        cycles = int(10_000_000 / start.elapsed_time(end) * args.busy_ms)

    def step():
        batch = build_sampling_batch(rows, lambda i: 31, device, args.vocab, (2,))
        for r in rows:
            r.disallowed = None  # as a new request's first step: its allowed-ids mask goes up too
        return sampler(logits, batch)

    step()  # warm
    host_ms = []
    for _ in range(args.iters):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda._sleep(cycles)  # the forward still running on the device
        t0 = time.perf_counter()
        step()
        host_ms.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            torch.cuda.synchronize()
    syncs = None
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
        torch.cuda.set_sync_debug_mode(0)
        syncs = sorted({str(w.message).splitlines()[0] for w in caught})
        syncs = {"count": len(caught), "kinds": syncs}
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "batch": args.batch,
                      "vocab": args.vocab, "busy_ms": args.busy_ms if cuda else 0,
                      "host_ms_median": round(statistics.median(host_ms), 3),
                      "host_ms_min": round(min(host_ms), 3), "syncs": syncs}, indent=1))


if __name__ == "__main__":
    main()
