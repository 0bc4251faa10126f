"""Accuracy and memory of each quantization scheme on one model, through the engine.

For every scheme (``none`` = the unquantized model) it measures:

- perplexity of ``text.txt`` (shipped here, ~2.8k SmolLM2 tokens), from the engine's prompt
  logprobs over windows of ``--window`` tokens advancing by ``--stride`` (each window scores only
  tokens the previous one did not, so every token is scored once, with at least
  ``window - stride`` tokens of context after the first window);
- greedy-token agreement with the unquantized model on ``--prompts`` prompts cut from the
  text: (a) teacher-forced top-1 agreement, the share of positions of the unquantized model's
  greedy continuation that the quantized model also ranks first; (b) free-running, the share of
  generated tokens identical to the unquantized model's, and how many continuations match fully;
- weight bytes held by the model (all parameters and buffers) and by its linear layers alone,
  and the KV cache tokens the engine allocated.

Usage (CPU, bundled SmolLM2 Q4_1 GGUF)::

    python benchmarks/quantization/perplexity.py --schemes none,int8,fp8,gguf \
        --out benchmarks/quantization/results/cpu-smollm2.json

``fp8+lm_head`` is fp8 with the LM head quantized too (``TESSELLM_FP8_LM_HEAD=1``), its product
run at every position (``_head_w8a16_everywhere``); ``fp8+lm_head_norefine`` without the
dense refinement of the top 16 logits.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) per window; every position >= 1 scored once.

    A window's first token has no logprob, so windows must overlap: stride < window.
    """
    if not 0 < stride < window:
        raise ValueError(f"--stride ({stride}) must be in (0, --window ({window})): windows must "
                         "overlap so each scored token has context in its window.")
    out, start, scored_to = [], 0, 1
    while scored_to < n:
        end = min(start + window, n)
        out.append((start, end, scored_to))
        scored_to = end
        start = end - (window - stride) if end < n else end
    return out


def _linear_bytes(model) -> int:
    from tessellm.layers.linear import Linear

    total = 0
    for m in model.modules():
        if isinstance(m, Linear):
            total += sum(t.nbytes for t in m.parameters(recurse=True) if t is not m.bias)
            total += sum(t.nbytes for t in m.buffers(recurse=True) if t is not None)
    return total


def _head_w8a16_everywhere(llm, refine: bool) -> None:
    """``+lm_head``: the engine takes the fp8 head only where the backend's fp8 product is
    weight-only (cuda: decode, up to 32 rows) and the dense head elsewhere, prompt logprobs
    included, so perplexity would not see it. Here its product runs at every position, as a
    decode step computes each token's logits: W8A16 of the e4m3 copy (x as it is, float32
    sums), the 16 largest logits recomputed from the dense weight (``fp8_head_mm``), or not
    (``+lm_head_norefine``)."""
    import torch.nn.functional as F

    from tessellm.layers.vocab import ParallelLMHead
    from tessellm.loader.model_loader import fp8_head_mm

    class W8A16:  # a QuantOps whose fp8 product is weight-only at every row count
        fp8_w8a8_rows = staticmethod(lambda rows: False)
        fp8_mm = staticmethod(lambda x, w: F.linear(x, w.dequantize(x.dtype)))

    for head in llm.engine.core.runner.model.modules():
        if isinstance(head, ParallelLMHead):
            assert head.quant_weight is not None, "TESSELLM_FP8_LM_HEAD=1 set no fp8 head"
            dense = head.tied if head.tied is not None else head.weight
            head.quant_mm = fp8_head_mm(W8A16(), dense, F.linear, 16 if refine else 0)


def evaluate(scheme: str, args, ids: list[int], prompts: list[list[int]], reference) -> dict:
    from tessellm.core.sampling_params import SamplingParams
    from tessellm.entrypoints.llm import LLM
    from tessellm.quantization.loading import weight_bytes

    t0 = time.perf_counter()
    base, _, extra = scheme.partition("+")  # "fp8+lm_head": TESSELLM_FP8_LM_HEAD=1 as well
    if extra not in ("", "lm_head", "lm_head_norefine") or (extra and base != "fp8"):
        raise ValueError(f"scheme {scheme!r}: only fp8 takes a suffix, '+lm_head' or "
                         "'+lm_head_norefine'")
    os.environ["TESSELLM_FP8_LM_HEAD"] = "1" if extra else "0"
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.window + 64,
              quantization=None if base == "none" else base, enable_prefix_caching=False,
              max_num_batched_tokens=max(2048, args.window), seed=0)
    if extra:
        _head_w8a16_everywhere(llm, refine=extra == "lm_head")
    load_s = time.perf_counter() - t0
    core = llm.engine.core
    model = core.runner.model
    row = {"scheme": scheme, "load_s": round(load_s, 2), "weight_bytes": weight_bytes(model),
           "linear_bytes": _linear_bytes(model),
           "kv_tokens": core.info.num_kv_blocks * core.info.block_size,
           "kv_dtype": str(getattr(core, "kv_dtype", core.dtype)).replace("torch.", "")}

    # perplexity
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    score = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    for start, end, first in _windows(len(ids), args.window, args.stride):
        out = llm.generate([{"prompt_token_ids": ids[start:end]}], score, use_tqdm=False)[0]
        for pos in range(first, end):
            entry = out.prompt_logprobs[pos - start]
            nll -= entry[ids[pos]].logprob
            count += 1
    row["ppl"] = math.exp(nll / count)
    row["scored_tokens"] = count
    row["ppl_s"] = round(time.perf_counter() - t0, 2)

    if args.no_agreement:
        del llm, core, model
        gc.collect()
        return row, None

    # greedy agreement
    t0 = time.perf_counter()
    greedy = SamplingParams(max_tokens=args.gen_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    generated = [o.outputs[0].token_ids for o in outs]
    row["gen_s"] = round(time.perf_counter() - t0, 2)
    if reference is not None:
        same = sum(a == b for g, r in zip(generated, reference) for a, b in zip(g, r))
        row["free_running_token_agreement"] = same / sum(len(r) for r in reference)
        row["identical_continuations"] = sum(g == r for g, r in zip(generated, reference))
        top1, total = 0, 0
        forced = llm.generate([{"prompt_token_ids": p + r} for p, r in zip(prompts, reference)],
                              score, use_tqdm=False)
        for p, r, o in zip(prompts, reference, forced):
            for j, tok in enumerate(r):
                entry = o.prompt_logprobs[len(p) + j]
                top1 += entry[tok].rank == 1
                total += 1
        row["teacher_forced_top1_agreement"] = top1 / total
    del llm, core, model
    gc.collect()
    return row, generated


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2 Q4_1 GGUF")
    p.add_argument("--schemes", default="none,int8,fp8,gguf")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--text", default=os.path.join(HERE, "text.txt"))
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--no-agreement", action="store_true",
                   help="perplexity only: no greedy generation, no agreement columns (much "
                        "faster where the scheme is emulated on the cpu, as fp8 is)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    from tessellm.config import resolve_model
    from tessellm.loader.model_loader import load_tokenizer

    source = resolve_model(args.model)
    tok = load_tokenizer(source.path, source.kind)
    with open(args.text) as f:
        ids = tok(f.read())["input_ids"]
    step = (len(ids) - args.prompt_len) // args.prompts
    prompts = [ids[i * step:i * step + args.prompt_len] for i in range(args.prompts)]

    schemes = args.schemes.split(",")
    if schemes[0] != "none":
        schemes.insert(0, "none")  # agreement (and "vs none") needs the unquantized reference
    rows, reference = [], None
    for scheme in schemes:
        row, generated = evaluate(scheme, args, ids, prompts, reference)
        if scheme == "none":
            reference = generated
        rows.append(row)
        print(json.dumps(row), flush=True)

    base = rows[0]
    print(f"\n{len(ids)} tokens of {os.path.basename(args.text)}; model {source.path}; "
          f"device {args.device}\n")
    print("| scheme | perplexity | vs none | teacher-forced top-1 | free-running tokens | "
          "identical | weight MB | linear MB | linear vs none |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        agree = ("n/a | n/a | n/a" if args.no_agreement else
                 f"{r.get('teacher_forced_top1_agreement', 1.0):.4f} | "
                 f"{r.get('free_running_token_agreement', 1.0):.4f} | "
                 f"{r.get('identical_continuations', args.prompts)}/{args.prompts}")
        print(f"| {r['scheme']} | {r['ppl']:.3f} | {100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | "
              f"{agree} | "
              f"{r['weight_bytes'] / 1e6:.1f} | {r['linear_bytes'] / 1e6:.1f} | "
              f"{r['linear_bytes'] / base['linear_bytes']:.3f} |")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=HERE).stdout.strip()
        meta = {"date": datetime.date.today().isoformat(), "commit": commit,
                "machine": platform.processor() or platform.machine(), "device": args.device,
                "model": source.path, "text_tokens": len(ids), "window": args.window,
                "stride": args.stride, "prompts": args.prompts, "gen_tokens": args.gen_tokens}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
