"""Per-token decode time of a Gemma 2-shaped tiny model on the cpu backend (float32, greedy).

    PYTHONPATH=. python benchmarks/cpu_gemma2_decode.py [--batch 1 8] [--prompt-len 512]
        [--output-len 64] [--rounds 3] [--threads N] [--output-json F]

Gemma 2 2B's attention shape (8 query heads, 4 KV heads, head size 256, attention logit cap 50,
final cap 30, sliding window 4096 on every other layer, ``query_pre_attn_scalar`` 256) on a
narrow, shallow body (hidden 512, 4 layers, vocabulary 4096) with random weights, so that
attention is a visible part of a step. Each batch size runs ``--rounds`` times; a round submits
``batch`` prompts of ``--prompt-len`` random tokens and decodes ``--output-len`` tokens each
(ignore_eos), timing each step after every request has its first token: the figures are ms per
decode step (one token for each sequence), wall and process CPU time, the median step of a
round, the least over rounds (on a shared machine other work only ever adds time). With
``--threads 1`` the CPU time is the step's work alone, the figure to compare on a loaded machine.

Run it against two trees to compare them (the script only imports ``tessellm``), e.g. the
soft-capped layers' decode on the C kernel against the explicit-SDPA path of the tree before::

    PYTHONPATH=/tmp/before python benchmarks/cpu_gemma2_decode.py
    PYTHONPATH=. python benchmarks/cpu_gemma2_decode.py
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

import torch


def save_model(path: str) -> str:
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(vocab_size=4096, hidden_size=512, intermediate_size=1024,
                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                          attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                          max_position_embeddings=8192, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def decode_ms(llm, batch: int, prompt_len: int, out_len: int, seed: int) -> list[tuple[float, float]]:
    """(wall ms, process CPU ms) of each decode step of ``batch`` requests decoding together (the
    steps after every request has its first token)."""
    from tessellm import SamplingParams

    rng = random.Random(seed)
    engine = llm.engine
    final_only, engine.outputs.final_only = engine.outputs.final_only, False
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    try:
        for i in range(batch):
            ids = [rng.randrange(3, 4096) for _ in range(prompt_len)]
            engine.add_request(f"r{seed}-{i}", {"prompt_token_ids": ids}, params)
        started, steps = set(), []
        while engine.has_unfinished_requests():
            t, c = time.perf_counter(), time.process_time()
            outs = engine.step()
            if len(started) == batch:
                steps.append(((time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3))
            for out in outs:
                if out.outputs[0].token_ids:
                    started.add(out.request_id)
        return steps
    finally:
        engine.outputs.final_only = final_only


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--output-json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    import tessellm
    from tessellm import LLM
    from tessellm.backends.cpu import native

    result = {"tessellm": tessellm.__file__, "threads": torch.get_num_threads(),
              "native": native.load() is not None, "ms_per_step": {}}
    with tempfile.TemporaryDirectory() as tmp:
        with LLM(save_model(tmp), dtype="float32", device="cpu", enforce_eager=True,
                 max_model_len=args.prompt_len + args.output_len + 16) as llm:
            decode_ms(llm, 1, 32, 4, seed=-1)  # warm-up (the C kernels build here)
            kernel = llm.engine.core.runner.model.layers[0].self_attn.attn.kernel
            result["c_decode_kernel"] = getattr(kernel, "native", None) is not None
            for b in args.batch:
                steps = [decode_ms(llm, b, args.prompt_len, args.output_len, seed=r)
                         for r in range(args.rounds)]
                wall = [statistics.median(w for w, _ in s) for s in steps]
                cpu = [statistics.median(c for _, c in s) for s in steps]
                result["ms_per_step"][b] = round(min(wall), 3)
                result.setdefault("cpu_ms_per_step", {})[b] = round(min(cpu), 3)
                result.setdefault("round_medians_ms", {})[b] = [round(m, 2) for m in wall]
    print(json.dumps(result, indent=1))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
