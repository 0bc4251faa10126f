"""Batch-1 decode steps of the bundled SmolLM2 Q4_1 GGUF through the eager ``quantization="gguf"``
path, with the cpu backend's fast paths on ("new") and off ("old": torch RMSNorm, the generic
quantized ``apply``, rotary and cache write outside the decode kernel, torch's SiLU-and-mul;
``--paths`` picks which of them "old" turns off), in one process,
interleaved rounds, 128-token prompts, greedy. Prints min / p20 / median ms per decode step
and whether the greedy tokens of both are equal (they must be: each path is bitwise the one it
replaces). On a shared machine read the min and p20 and prefer ``--threads 1``.

    PYTHONPATH=. TESSELLM_PLUGINS=cpu python benchmarks/cpu_b1_ab.py --threads 2 --rounds 3   # from the repo root
"""

from __future__ import annotations

import argparse
import os
import statistics

from cpu_b1 import prompt_ids
from cpu_b1_steps import run  # (ms of each decode step, greedy tokens) of one request


PATHS = ("apply", "norm", "fused", "silu")


def switches(llm, paths=PATHS):
    """A function turning the named fast paths on (True) or off (False) in this process:
    ``apply`` the direct quantized apply, ``norm`` the native RMSNorm, ``fused`` rotary and cache
    write inside the decode kernel, ``silu`` the native SiLU-and-mul."""
    from tessellm.backends.cpu import attention as cpu_attn
    from tessellm.backends.cpu import ops as cpu_ops

    method = llm.engine.core.runner.model.layers[0].mlp.gate_up_proj.quant_method
    direct = method.apply
    generic = direct.__closure__[0].cell_contents  # the generic apply direct_apply wraps
    norm, fusable, silu = cpu_ops.CpuOps._native_norm, cpu_attn.fusable, cpu_ops.CpuOps._native_silu

    def set_new(new: bool) -> None:
        if "apply" in paths:
            method.apply = direct if new else generic
        if "norm" in paths:
            cpu_ops.CpuOps._native_norm = norm if new else (lambda *a: None)
        if "fused" in paths:
            cpu_attn.fusable = fusable if new else (lambda *a: False)
        if "silu" in paths:
            cpu_ops.CpuOps._native_silu = silu if new else (lambda *a: None)
    return set_new


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-len", type=int, default=40)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                   help="the fast paths that \"old\" turns off (default: all)")
    args = p.parse_args()
    import torch

    from tessellm import LLM
    from tessellm.loader.default_model import default_model_path

    torch.set_num_threads(args.threads)
    llm = LLM(default_model_path(), quantization="gguf", dtype="float32", max_model_len=512,
              num_kv_blocks=64, max_num_seqs=4, enable_prefix_caching=False, enforce_eager=True)
    set_new = switches(llm, args.paths)
    for new in (True, False):  # warm-up, untimed
        set_new(new)
        run(llm, prompt_ids(128, 49152, 0), 8, f"warm-{new}")
    steps, tokens = {False: [], True: []}, {False: [], True: []}
    for r in range(args.rounds):
        for new in (False, True):
            set_new(new)
            t, tok = run(llm, prompt_ids(128, 49152, r + 1), args.output_len, f"{new}-{r}")
            steps[new] += t
            tokens[new].append(tok)
    for new in (False, True):
        t = sorted(steps[new])
        print(f"{'new' if new else 'old'}: min {t[0]:.2f} p20 {t[len(t) // 5]:.2f} "
              f"median {statistics.median(t):.2f} ms per decode step ({args.threads} threads)")
    print(f"greedy tokens equal: {tokens[False] == tokens[True]}; load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
