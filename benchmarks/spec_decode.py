"""Speculative decoding on the device: each part compares against no speculation in the same run.

  smollm  real SmolLM2 weights (bundled GGUF, bf16), n-gram on copy-heavy prompts ("repeat /
          edit this passage"): batch-1 ms per output token and acceptance length, k = 3 and 5
  replay  Llama-3.1-8B shapes (dummy bf16), B1 (512 in / 256 out) with the replay proposer for
          k = 1..7 (one engine; k changed between runs) against the plain engine
  f       workload F (256 x 512 in / 256 out, greedy) with speculation on (replay, k = 3) and the
          load policy active, against F without it
  draft   hook for the draft-model timing (benchmarks/spec_decode_draft.py if present)

Usage: python benchmarks/spec_decode.py PART [PART ...] --out DIR. Results: DIR/spec_<part>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tessellm import LLM, SamplingParams  # noqa: E402
from tessellm.entrypoints.bench_throughput import make_requests  # noqa: E402
from tessellm.entrypoints.chat_utils import render_chat  # noqa: E402

LLAMA8B = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model-configs", "llama-3.1-8b")

PASSAGES = [
    "The river rose slowly through the night, and by morning the lower fields were under a sheet "
    "of brown water. Farmers gathered at the bridge to watch the current carry fence posts, hay "
    "bales and a single red boat downstream. Nobody spoke much. The oldest among them said the "
    "flood of 1952 had been worse, but that the water had gone down within a week.",
    "def merge_sorted(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n        else:\n"
    "            out.append(b[j])\n            j += 1\n    out.extend(a[i:])\n    out.extend(b[j:])\n"
    "    return out\n",
    "Our quarterly report shows revenue of 4.2 million dollars, up 12 percent from the previous "
    "quarter. Operating costs rose by 3 percent, mainly because of new hires in the support team. "
    "The board approved the budget for the next two quarters and asked the finance team to "
    "prepare a forecast for the coming year by the end of the month.",
    "To reset your password, open the settings page and choose Account. Click the button that "
    "says Change password, enter your current password, then type the new password twice. The "
    "new password must have at least twelve characters, one number and one symbol. You will be "
    "signed out of every device once the change is saved.",
]
TASKS = ["Repeat the following passage exactly, word for word:\n\n{}",
         "Rewrite the following passage, changing nothing except fixing any typos:\n\n{}"]


def save(args, name: str, result: dict) -> None:
    """Write the part's JSON now (a time box that ends the part keeps what was measured)."""
    with open(os.path.join(args.out, f"spec_{name}.json"), "w") as f:
        json.dump(result, f, indent=2)


def b1(llm, prompts: list[list[int]], max_tokens: int) -> tuple[list[float], list[list[int]]]:
    """Batch 1: time per output token after the first (TTFT excluded) for each prompt, and the
    tokens. One warm-up request first."""
    engine = llm.engine
    final_only, engine.outputs.final_only = engine.outputs.final_only, False
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    tpots, outs = [], []
    try:
        for it, prompt in enumerate([prompts[0]] + list(prompts)):
            engine.add_request(f"b1-{time.monotonic_ns()}", {"prompt_token_ids": prompt}, params)
            start, first, tokens = time.perf_counter(), None, []
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if first is None and out.outputs[0].token_ids:
                        first = time.perf_counter()
                    tokens = list(out.outputs[0].token_ids)
            end = time.perf_counter()
            if it:
                tpots.append((end - first) / max(len(tokens) - 1, 1))
                outs.append(tokens)
    finally:
        engine.outputs.final_only = final_only
    return tpots, outs


def spec_stats(llm) -> dict:
    return llm.engine.core.scheduler.spec_stats.as_dict()


def reset_stats(llm) -> None:
    from tessellm.spec_decode.metrics import SpecDecodeStats

    llm.engine.core.scheduler.spec_stats = SpecDecodeStats()


def set_k(llm, k: int) -> None:
    """Benchmark only: change k of a running single-device engine between runs."""
    spec = llm.engine.core.runner.spec
    spec.config.num_speculative_tokens = k
    spec.proposer.k = k


def close(llm) -> None:
    llm.shutdown()
    del llm
    gc.collect()


def part_smollm(args) -> dict:
    base = LLM(dtype=args.dtype, max_model_len=2048, enable_prefix_caching=False)
    tok = base.get_tokenizer()
    prompts = [[int(t) for t in render_chat(tok, [{"role": "user", "content": task.format(p)}], True, None)]
               for task in TASKS for p in PASSAGES]
    plain, want = b1(base, prompts, args.smollm_tokens)
    close(base)
    result = {"model": "SmolLM2-135M-Instruct (bundled GGUF)", "dtype": args.dtype,
              "num_prompts": len(prompts), "max_tokens": args.smollm_tokens,
              "plain_ms_per_token": round(statistics.median(plain) * 1e3, 3), "ngram": {}}
    for k in args.smollm_ks:
        llm = LLM(dtype=args.dtype, max_model_len=2048, enable_prefix_caching=False,
                  speculative_config={"method": "ngram", "num_speculative_tokens": k})
        tpots, got = b1(llm, prompts, args.smollm_tokens)
        ms = statistics.median(tpots) * 1e3
        result["ngram"][str(k)] = {"ms_per_token": round(ms, 3),
                                   "speedup": round(result["plain_ms_per_token"] / ms, 3),
                                   "tokens_equal_plain": sum(a == b for a, b in zip(got, want)),
                                   **spec_stats(llm)}
        save(args, "smollm", result)
        close(llm)
    return result


def part_replay_and_f(args, parts) -> dict:
    """B1 with replay for each k and F with the load policy, against the plain engine."""
    common = dict(model=args.model_8b, load_format="dummy", dtype=args.dtype, max_model_len=args.max_model_len,
                  enable_prefix_caching=False)
    base = LLM(**common)
    vocab = base.engine.core.vocab_size
    b1_prompts = [r.prompt_token_ids for r in
                  (make_requests(1, args.input_len, args.output_len, 0.0, vocab, args.seed + i)[0] for i in range(args.b1_iters))]
    result, records = {"model": "Llama-3.1-8B shapes, dummy bf16"}, []
    if "replay" in parts:
        plain, outs = b1(base, b1_prompts, args.output_len)
        result["b1_plain_ms_per_token"] = round(statistics.median(plain) * 1e3, 3)
        records += [{"prompt_token_ids": p, "output_token_ids": o} for p, o in zip(b1_prompts, outs)]
    f_reqs = make_requests(args.f_prompts, args.input_len, args.output_len, 0.0, vocab, args.seed + 1000)
    f_params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    if "f" in parts:
        secs, outs = _f(base, f_reqs, f_params)
        result["f_plain_tok_per_s"] = round(args.f_prompts * args.output_len / secs, 1)
        records += [{"prompt_token_ids": r.prompt_token_ids, "output_token_ids": o}
                    for r, o in zip(f_reqs, outs)]
    close(base)
    save(args, "_".join(parts), result)
    k_max = max(args.ks)
    llm = LLM(**common, speculative_config={"method": "replay", "num_speculative_tokens": k_max,
                                            "replay_records": records})
    if "replay" in parts:
        result["b1_replay"] = {}
        for k in args.ks:
            set_k(llm, k)
            reset_stats(llm)
            tpots, _ = b1(llm, b1_prompts, args.output_len)
            ms = statistics.median(tpots) * 1e3
            result["b1_replay"][str(k)] = {"ms_per_token": round(ms, 3),
                                           "speedup": round(result["b1_plain_ms_per_token"] / ms, 3),
                                           **spec_stats(llm)}
            print(json.dumps({"k": k, **result["b1_replay"][str(k)]}), flush=True)
            save(args, "_".join(parts), result)
    if "f" in parts:
        set_k(llm, 3)
        reset_stats(llm)
        secs, _ = _f(llm, f_reqs, f_params)
        tps = args.f_prompts * args.output_len / secs
        result["f_spec"] = {"method": "replay", "k": 3,
                            "disable_by_batch_size": llm.engine.core.runner.spec.config.disable_by_batch_size,
                            "tok_per_s": round(tps, 1),
                            "ratio_to_plain": round(tps / result["f_plain_tok_per_s"], 3), **spec_stats(llm)}
    close(llm)
    return result


def _f(llm, reqs, params) -> tuple[float, list[list[int]]]:
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs[:8]], params, use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs], params, use_tqdm=False)
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outs]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("parts", nargs="+", choices=["smollm", "replay", "f", "draft"])
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/tessellm-out"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--smollm-tokens", type=int, default=160)
    p.add_argument("--smollm-ks", type=int, nargs="+", default=[3, 5])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7])
    p.add_argument("--b1-iters", type=int, default=3)
    p.add_argument("--f-prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--model-8b", default=LLAMA8B, help="the replay / F model (a smoke test: a tiny one)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    jobs = []
    if "smollm" in args.parts:
        jobs.append(("smollm", lambda: part_smollm(args)))
    if "replay" in args.parts or "f" in args.parts:
        parts = [x for x in args.parts if x in ("replay", "f")]
        jobs.append(("_".join(parts), lambda: part_replay_and_f(args, parts)))
    if "draft" in args.parts:
        jobs.append(("draft", _draft_hook))
    for name, job in jobs:
        result = job()
        print(json.dumps({name: result}, indent=2), flush=True)
        with open(os.path.join(args.out, f"spec_{name}.json"), "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _draft_hook() -> dict:
    """The draft-model timing lives with the draft proposer (benchmarks/spec_decode_draft.py:
    a ``run() -> dict``); absent: nothing measured."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spec_decode_draft.py")
    if not os.path.exists(path):
        return {"skipped": "benchmarks/spec_decode_draft.py is not there"}
    import importlib.util

    spec = importlib.util.spec_from_file_location("spec_decode_draft", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run()


if __name__ == "__main__":
    sys.exit(main())
