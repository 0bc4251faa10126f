"""HF transformers' static batch on workload F's shapes, with per-step timing that survives a
time box (GPU only).

    PYTHONPATH=. python3 benchmarks/moe_hf.py --out $OUT/f_moe_hf.json [--batch 256]

The model: ``AutoModelForCausalLM.from_config`` of the given config on the GPU in bf16 (random
weights; its default attention and experts implementations, recorded in the JSON), eval mode.
One batch of ``--batch`` random 512-token prompts (equal lengths: no padding) generates 256
tokens greedily (``min_new_tokens`` = ``max_new_tokens``), after a warm-up generate of 2
prompts x 8 tokens. A stopping criterion notes the time of every step, and the JSON is
rewritten every 8 steps: prefill seconds (generate's start to the first token), decode seconds
per step (median), steps done. When the run completes, ``output_tokens_per_s`` is measured
(batch x 256 / elapsed); when a time box cuts it, ``estimated_output_tokens_per_s`` =
batch x 256 / (prefill + 256 x median step) from the steps it did (marked ``complete: false``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/model-configs/qwen3-30b-a3b")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    from transformers import (AutoConfig, AutoModelForCausalLM, StoppingCriteria,
                              StoppingCriteriaList)

    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(args.model)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    res = {"batch": args.batch, "input_len": args.input_len, "output_len": args.output_len,
           "load_s": round(time.perf_counter() - t0, 1),
           "attn_implementation": getattr(model.config, "_attn_implementation", None),
           "experts_implementation": getattr(model.config, "_experts_implementation", None),
           "complete": False}
    print("HF model ready", res, flush=True)
    stamps: list[float] = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            if len(stamps) % 8 == 0:
                write()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def write():
        if not stamps:
            return
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        res["prefill_s"] = round(stamps[0] - start, 3)
        res["steps_done"] = len(stamps)
        if steps:
            step = statistics.median(steps)
            res["decode_step_ms_median"] = round(step * 1e3, 2)
            est = res["prefill_s"] + (args.output_len - 1) * step
            res["estimated_output_tokens_per_s"] = round(args.batch * args.output_len / est, 1)
        args.out.write_text(json.dumps(res, indent=1))

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    rng = random.Random(0)
    vocab = config.vocab_size

    def ids(n: int, length: int):
        return torch.tensor([[rng.randrange(vocab) for _ in range(length)] for _ in range(n)],
                            device=args.device)

    def generate(x, new: int, criteria=None):
        with torch.no_grad():
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                           stopping_criteria=criteria)

    generate(ids(2, args.input_len), 8)
    x = ids(args.batch, args.input_len)
    sync()
    start = time.perf_counter()
    generate(x, args.output_len, StoppingCriteriaList([Clock()]))
    sync()
    elapsed = time.perf_counter() - start
    write()
    res.update(complete=True, elapsed_s=round(elapsed, 3),
               output_tokens_per_s=round(args.batch * args.output_len / elapsed, 1))
    args.out.write_text(json.dumps(res, indent=1))
    print("HF", json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
