"""Time to first token of a prompt whose prefix a recurrent-state model has cached
(core/state_prefix.py), against the same prompt with prefix caching off: random weights, token
ids fed, one GPU (the models of ``recurrent_state_graphs.py``).

Per model: an engine starts; a warm-up prompt runs; then prompt A (``--input-len`` tokens) is
prefilled and answered with one token; then prompt B = A + ``--suffix`` tokens is sent and its
first token timed (the engine's own steps, synchronously). With prefix caching on, B starts from
the state snapshot after A's last full block; off, it is computed whole. One JSON line per
model: both TTFTs, B's cached tokens, the snapshots kept::

    python benchmarks/mprefix_ttft.py --models granite4h --input-len 3000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recurrent_state_graphs import write_config  # noqa: E402


def ttft(path: str, input_len: int, suffix: int, cache: bool, dtype: str, device: str) -> dict:
    import torch

    from tessellm import LLM, SamplingParams

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    a = [(7 * j) % 1000 + 10 for j in range(input_len)]
    b = a + [(11 * j) % 1000 + 10 for j in range(suffix)]
    with LLM(path, load_format="dummy", dtype=dtype, max_model_len=input_len + suffix + 64,
             max_num_seqs=8, enable_prefix_caching=cache, device=device) as llm:
        llm.generate([{"prompt_token_ids": [5] * 256}], one, use_tqdm=False)  # warm
        llm.generate([{"prompt_token_ids": a}], one, use_tqdm=False)
        sync()
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": b}], one, use_tqdm=False)[0]
        sync()
        ms = (time.perf_counter() - t) * 1e3
        states = llm.engine.core.kv.states
        return {"ttft_ms": round(ms, 1), "cached_tokens": out.num_cached_tokens,
                "snapshots": states.num_slots if states is not None else 0}


def check_length(path: str, need: int) -> None:
    """The prompts (and 64 spare positions) fit the written model's length, or a clear exit."""
    from transformers import AutoConfig

    from tessellm.config import resolve_max_model_len

    limit = resolve_max_model_len(None, AutoConfig.from_pretrained(path))
    if need > limit:
        raise SystemExit(f"{os.path.basename(path)}: --input-len + --suffix + 64 = {need} exceeds its "
                         f"{limit} positions; use a shorter --input-len.")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["granite4h"])
    p.add_argument("--input-len", type=int, default=3000)  # granite4h: 4096 positions
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--layers", type=int, default=0, help="0: the model's own layer count")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", help="cuda, or cpu (a small --layers)")
    args = p.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as root:
        for name in args.models:
            path = write_config(name, args.layers, root)
            check_length(path, args.input_len + args.suffix + 64)
            where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
            row = {"model": name, "device": where, "layers": args.layers, "input_len": args.input_len,
                   "suffix": args.suffix}
            for cache in (True, False):
                row["cache_on" if cache else "cache_off"] = ttft(path, args.input_len, args.suffix,
                                                                 cache, args.dtype, args.device)
            row["speedup"] = round(row["cache_off"]["ttft_ms"] / row["cache_on"]["ttft_ms"], 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
