"""Eager vs ``torch.compile``d decode on the cpu backend: ms per decode step at several batch
sizes, compile time, and greedy-token parity. One process, eager first, so both see the same
machine state; each figure is the minimum over ``--rounds`` (CPU timings are noisy when other
processes share the cores: OpenMP threads spin-wait and lose their time slices).

    PYTHONPATH=. python benchmarks/cpu_compile.py --batches 1 16 64 --output-json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time


def decode_ms(llm, batch: int, prompt_len: int, steps: int, rounds: int, seed: int) -> list[float]:
    """Per round: mean ms of ``steps`` engine steps once ``batch`` requests are all decoding."""
    from tessellm import SamplingParams
    from tessellm.sampling_params import RequestOutputKind  # FINAL_ONLY: steps build no per-step outputs

    engine, vocab = llm.engine, llm.engine.core.vocab_size
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    rng = random.Random(seed)
    out = []
    for r in range(rounds):
        for i in range(batch):
            ids = [rng.randrange(vocab) for _ in range(prompt_len)]
            engine.add_request(f"b{batch}-r{r}-{i}", {"prompt_token_ids": ids}, params)
        engine.step()  # prefill (all prompts fit one step) and the first token
        while engine.core.scheduler.waiting:
            engine.step()
        engine.step()  # the first pure-decode step, untimed
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        out.append((time.perf_counter() - t0) / steps * 1e3)
        while engine.has_unfinished_requests():
            engine.step()
    return out


def greedy(llm, n: int, seed: int) -> list[list[int]]:
    from tessellm import SamplingParams

    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(llm.engine.core.vocab_size)
                                     for _ in range(rng.randint(5, 60))]} for _ in range(n)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--freezing", action="store_true", help="inductor freezing (prepacked weights)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()

    import torch

    from tessellm import LLM
    from tessellm.backends.cpu.graph_runner import CompiledDecodeRunner, cpu_capture_sizes

    llm = LLM(device="cpu", dtype="float32", max_num_seqs=args.max_num_seqs, enforce_eager=True,
              enable_prefix_caching=False)
    runner = llm.engine.core.runner
    core = llm.engine.core
    result = {"model": core.source.path, "dtype": "float32", "max_model_len": core.max_model_len,
              "num_kv_blocks": core.info.num_kv_blocks,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "loadavg_start": os.getloadavg(), "freezing": args.freezing,
              "prompt_len": args.prompt_len, "steps": args.steps, "rounds": args.rounds,
              "eager_ms_per_step": {}, "compiled_ms_per_step": {}}
    tokens_eager = greedy(llm, 8, 1)
    for b in args.batches:
        result["eager_ms_per_step"][b] = decode_ms(llm, b, args.prompt_len, args.steps, args.rounds, b)
        print("eager", b, result["eager_ms_per_step"][b], flush=True)

    sizes = cpu_capture_sizes(args.max_num_seqs)
    runner.graph_runner = CompiledDecodeRunner(sizes, {"freezing": True} if args.freezing else None)
    runner.capture_graphs()
    result["capture_sizes"] = sizes
    result["compile_s"] = round(runner.graph_runner.compile_seconds, 1)
    result["exact_sizes"] = runner.graph_runner.exact_sizes
    print("compile_s", result["compile_s"], flush=True)
    tokens_compiled = greedy(llm, 8, 1)
    result["greedy_identical"] = tokens_compiled == tokens_eager
    for b in args.batches:
        result["compiled_ms_per_step"][b] = decode_ms(llm, b, args.prompt_len, args.steps, args.rounds, b)
        print("compiled", b, result["compiled_ms_per_step"][b], flush=True)
    result["loadavg_end"] = os.getloadavg()
    result["summary"] = {b: {"eager_min_ms": round(min(result["eager_ms_per_step"][b]), 2),
                             "compiled_min_ms": round(min(result["compiled_ms_per_step"][b]), 2)}
                         for b in args.batches}
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
