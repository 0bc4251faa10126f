"""CPU batch 1 on the bundled SmolLM2 Q4_1 GGUF: tessellm float32, tessellm ``quantization="gguf"``
and llama.cpp (llama-cpp-python, when importable), 128-token prompt, greedy, 2 threads.

The engines are loaded once and measured in interleaved rounds (fp32, gguf, llama.cpp, fp32, ...)
so a change in the machine's load hits all of them alike; each figure is the median over rounds.
Also reports the greedy tokens' agreement: gguf against float32 (the dequantized GGUF weights).

    PYTHONPATH=. python benchmarks/cpu_b1.py --rounds 3 --output-len 64 --output-json b1.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def tessellm_run(llm, ids: list[int], out_len: int, tag: str):
    """(prefill ms, decode ms per token, tokens) of one greedy request through the engine."""
    from tessellm import SamplingParams

    engine = llm.engine
    final_only, engine.outputs.final_only = engine.outputs.final_only, False
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    try:
        start = time.perf_counter()
        engine.add_request(tag, {"prompt_token_ids": ids}, params)
        first, tokens = None, []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
                tokens = list(out.outputs[0].token_ids)
        end = time.perf_counter()
    finally:
        engine.outputs.final_only = final_only
    return (first - start) * 1e3, (end - first) * 1e3 / (out_len - 1), tokens


def llama_cpp_run(llm, ids: list[int], out_len: int):
    """The same request through llama.cpp: eval the prompt, then sample greedily token by token."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    tok = llm.sample(temp=0.0)
    first = time.perf_counter()
    tokens = [tok]
    for _ in range(out_len - 1):
        llm.eval([tok])
        tok = llm.sample(temp=0.0)
        tokens.append(tok)
    end = time.perf_counter()
    return (first - start) * 1e3, (end - first) * 1e3 / (out_len - 1), tokens


def load_engines(path: str, threads: int, with_llama: bool, compiled: bool = False):
    from tessellm import LLM

    kw = dict(dtype="float32", max_model_len=512, num_kv_blocks=64, max_num_seqs=4,
              enable_prefix_caching=False)
    engines = {"tessellm fp32": LLM(path, enforce_eager=True, **kw),
               "tessellm gguf": LLM(path, quantization="gguf", enforce_eager=True, **kw)}
    if compiled:  # the decode step through torch.compile (minutes on a cold inductor cache)
        start, old = time.perf_counter(), os.environ.get("TESSELLM_CPU_COMPILE")
        os.environ["TESSELLM_CPU_COMPILE"] = "1"
        try:
            engines["tessellm gguf compiled"] = LLM(path, quantization="gguf", **kw)
        finally:
            os.environ["TESSELLM_CPU_COMPILE"] = old if old is not None else "0"
        print(f"tessellm gguf compiled: built in {time.perf_counter() - start:.0f} s", flush=True)
    if with_llama:
        try:
            from llama_cpp import Llama
        except ImportError:
            print("llama-cpp-python is not installed: the llama.cpp column is skipped "
                  "(benchmark-only dependency; see benchmarks/cpu_speed.sh)")
        else:
            engines["llama.cpp"] = Llama(path, n_threads=threads, n_threads_batch=threads,
                                         n_ctx=512, n_batch=512, verbose=False)
    return engines


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="also a quantization='gguf' engine with TESSELLM_CPU_COMPILE=1")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    import torch

    from tessellm.loader.default_model import default_model_path

    torch.set_num_threads(args.threads)
    path = default_model_path()
    engines = load_engines(path, args.threads, not args.no_llama_cpp, args.compile)
    vocab = engines["tessellm fp32"].engine.core.vocab_size
    runs = {name: [] for name in engines}
    tokens = {}
    for r in range(args.rounds + 1):  # round 0 warms every engine up, untimed
        ids = prompt_ids(args.input_len, vocab, seed=r)
        for name, llm in engines.items():
            if name == "llama.cpp":
                res = llama_cpp_run(llm, ids, args.output_len)
            else:
                res = tessellm_run(llm, ids, args.output_len, f"{name}-{r}")
            if r:
                runs[name].append(res[:2])
            tokens.setdefault(r, {})[name] = res[2]
            print(f"round {r} {name}: prefill {res[0]:.1f} ms, decode {res[1]:.2f} ms/token",
                  flush=True)
    result = {"model": os.path.basename(path), "input_len": args.input_len,
              "output_len": args.output_len, "threads": args.threads, "rounds": args.rounds,
              "load_average": os.getloadavg(), "engines": {}}
    for name, rs in runs.items():
        result["engines"][name] = {
            "prefill_ms_median": round(statistics.median(x[0] for x in rs), 2),
            "decode_ms_per_token_median": round(statistics.median(x[1] for x in rs), 3),
            "decode_ms_per_token": [round(x[1], 3) for x in rs]}
    result["greedy_agreement"] = agreement(tokens, list(engines))
    ref = result["engines"].get("llama.cpp", {}).get("decode_ms_per_token_median")
    if ref:
        for name in [n for n in engines if n != "llama.cpp"]:
            e = result["engines"][name]
            e["decode_vs_llama_cpp"] = round(e["decode_ms_per_token_median"] / ref, 2)
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def agreement(tokens: dict, names: list[str]) -> dict:
    """Per engine: the number of leading greedy tokens equal to tessellm fp32's, per round."""
    out = {}
    for name in names[1:]:
        counts = []
        for by_engine in tokens.values():
            a, b = by_engine["tessellm fp32"], by_engine[name]
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            counts.append(f"{n}/{len(a)}")
        out[f"{name} vs tessellm fp32 (leading equal tokens)"] = counts
    return out


if __name__ == "__main__":
    raise SystemExit(main())
