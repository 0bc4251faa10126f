"""What the split add-RMSNorm's numerics (``TESSELLM_NORM_FOLD2``, ``kernels/gemm/norm_fold.py``)
do to a real model's perplexity, on the cpu.

The fold changes where the activation is rounded: the unfused path feeds the next product
``round(g * round(h * rstd))``, the fold feeds it ``round(h * g)`` and multiplies the product's
float32 sums by ``rstd``. The engine takes the fold only at batch-1 decode; here the same
arithmetic runs at every position (each row its own ``rstd``) through the engine's own decoder
wiring (``models.decoder._forward_fold2``), so the prompt logprobs of ``text.txt`` show it: the
model in bf16 (its ``--dtype``), perplexity unfused against folded, same windows as
``perplexity.py``. The consumer's product is the float32 product of the bf16 operands rounded
once, as the GPU GEMV's. ::

    python benchmarks/quantization/norm_fold_ppl.py [--dtype bfloat16] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # run from a checkout
sys.path.insert(0, HERE)

from perplexity import _windows  # noqa: E402


def _patch_every_row() -> None:
    """``fold_norm_out`` / ``fold_norm_in`` at any row count, in torch, each row its own sum of
    squares (the batch-1 kernels' arithmetic, row by row)."""
    import torch
    import torch.nn.functional as F

    from tessellm.layers.linear import NormFold
    from tessellm.models import decoder

    def fold_out(layer, x, residual, norm, consumer):
        if residual is None:
            return None
        y = layer(x)  # rounded to the model dtype, as the GEMV's outputs
        h = (y.float() + residual.float()).to(residual.dtype)
        residual.copy_(h)
        hf = h.float()
        xg = (hf * norm.weight.float()).to(y.dtype)
        return NormFold(xg, (hf * hf).sum(-1, keepdim=True), norm), residual

    def fold_in(layer, fold, silu_and_mul=False):
        x = fold.x
        rstd = torch.rsqrt(fold.sumsq / x.shape[-1] + fold.norm.eps)
        bias = None if layer.bias is None else layer.bias.float()
        y = (F.linear(x.float(), layer.weight.float()) * rstd
             + (0 if bias is None else bias)).to(x.dtype)
        return fold.norm.ops.silu_and_mul(y) if silu_and_mul else y

    decoder.fold_norm_out = fold_out
    decoder.fold_norm_in = fold_in


def perplexity(args, ids) -> dict:
    from tessellm.core.sampling_params import SamplingParams
    from tessellm.entrypoints.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(args.model, device="cpu", dtype=args.dtype, max_model_len=args.window + 64,
              enable_prefix_caching=False, max_num_batched_tokens=max(2048, args.window), seed=0)
    nll, count = 0.0, 0
    score = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    for start, end, first in _windows(len(ids), args.window, args.stride):
        out = llm.generate([{"prompt_token_ids": ids[start:end]}], score, use_tqdm=False)[0]
        for pos in range(first, end):
            nll -= out.prompt_logprobs[pos - start][ids[pos]].logprob
            count += 1
    llm.shutdown()
    return {"ppl": math.exp(nll / count), "scored_tokens": count,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2 Q4_1 GGUF")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--text", default=os.path.join(HERE, "text.txt"))
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from tessellm.config import resolve_model
    from tessellm.loader.model_loader import load_tokenizer

    source = resolve_model(args.model)
    tok = load_tokenizer(source.path, source.kind)
    with open(args.text) as f:
        ids = tok(f.read())["input_ids"]
    os.environ["TESSELLM_NORM_FOLD2"] = "0"
    rows = {"unfused": perplexity(args, ids)}
    print(json.dumps(rows), flush=True)
    os.environ["TESSELLM_NORM_FOLD2"] = "1"
    _patch_every_row()
    rows["fold2"] = perplexity(args, ids)
    rel = 100 * (rows["fold2"]["ppl"] / rows["unfused"]["ppl"] - 1)
    print(json.dumps(rows))
    print(f"{args.dtype}: unfused {rows['unfused']['ppl']:.3f}, fold2 {rows['fold2']['ppl']:.3f} "
          f"({rel:+.2f}%), {rows['unfused']['scored_tokens']} tokens; model {source.path}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"dtype": args.dtype, "model": source.path, "rows": rows,
                       "fold2_vs_unfused_pct": round(rel, 3)}, f, indent=2)


if __name__ == "__main__":
    main()
