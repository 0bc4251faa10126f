"""CPU AWQ / GPTQ speed on the bundled SmolLM2-135M: batch-1 decode ms per token and prefill
ms of a 128-token prompt, 2 threads, for

* ``fp32``: the GGUF's weights dequantized, saved as an HF safetensors checkpoint;
* ``awq`` / ``gptq``: that checkpoint quantized by the test-side packer
  (``tests/quantization/int4_checkpoint.write_int4``, round to nearest, asymmetric, groups of
  64: SmolLM2's hidden size 576 is not a multiple of 128), served by the cpu backend's int4 path
  (torch's CPU int4 kernel, bfloat16 activations; ``TESSELLM_CPU_INT4PACK=0`` for the float32
  reference ops instead);
* ``gguf``: the bundled Q4_1 GGUF with ``quantization="gguf"`` (the same int4 kernel).

Engines are loaded once and measured in interleaved rounds (as ``cpu_b1.py``), each figure the
median over rounds; round 0 warms up, untimed. Also the number of leading greedy tokens equal to
fp32's per round. The checkpoints are written once under ``--workdir``.

    PYTHONPATH=. python benchmarks/cpu_int4.py --rounds 3 --output-json int4.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_b1 import agreement, prompt_ids, tessellm_run  # noqa: E402

GROUP = 64


def checkpoints(gguf: str, workdir: str) -> dict:
    """``{"fp32": dir, "awq": dir, "gptq": dir}``, written once."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.quantization.int4_checkpoint import write_int4

    root = pathlib.Path(workdir)
    dense = root / "fp32"
    if not (dense / "model.safetensors").exists():
        folder, name = os.path.dirname(gguf), os.path.basename(gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # (save_pretrained refuses a model read from GGUF: the tensors and config by hand)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]  # (to_dict of a GGUF read has none)
        dense.mkdir(parents=True, exist_ok=True)
        save_file(state, str(dense / "model.safetensors"))
        (dense / "config.json").write_text(json.dumps(config))
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(dense)
    if not (root / "awq" / "model.safetensors").exists():
        write_int4(str(dense), root, fmts=("awq", "gptq"), group=GROUP, rtn=True)
    return {"fp32": str(dense), "awq": str(root / "awq"), "gptq": str(root / "gptq")}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/tessellm-cpu-int4")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    import torch

    from tessellm import LLM
    from tessellm.loader.default_model import default_model_path

    torch.set_num_threads(args.threads)
    gguf = default_model_path()
    dirs = checkpoints(gguf, args.workdir)
    kw = dict(dtype="float32", max_model_len=512, num_kv_blocks=64, max_num_seqs=4,
              enable_prefix_caching=False, enforce_eager=True, device="cpu")
    engines = {"fp32": LLM(dirs["fp32"], **kw), "awq": LLM(dirs["awq"], **kw),
               "gptq": LLM(dirs["gptq"], **kw), "gguf": LLM(gguf, quantization="gguf", **kw)}
    vocab = engines["fp32"].engine.core.vocab_size
    runs = {name: [] for name in engines}
    tokens = {}
    for r in range(args.rounds + 1):
        ids = prompt_ids(args.input_len, vocab, seed=r)
        for name, llm in engines.items():
            res = tessellm_run(llm, ids, args.output_len, f"{name}-{r}")
            if r:
                runs[name].append(res[:2])
            tokens.setdefault(r, {})[name] = res[2]
            print(f"round {r} {name}: prefill {res[0]:.1f} ms, decode {res[1]:.2f} ms/token",
                  flush=True)
    result = {"model": os.path.basename(gguf), "group_size": GROUP, "input_len": args.input_len,
              "output_len": args.output_len, "threads": args.threads, "rounds": args.rounds,
              "int4pack": os.environ.get("TESSELLM_CPU_INT4PACK", "1"),
              "load_average_at_end": os.getloadavg(), "engines": {}}
    for name, rs in runs.items():
        result["engines"][name] = {
            "prefill_ms_median": round(statistics.median(x[0] for x in rs), 2),
            "decode_ms_per_token_median": round(statistics.median(x[1] for x in rs), 3),
            "decode_ms_per_token": [round(x[1], 3) for x in rs]}
    names = list(engines)
    tokens = {r: {"tessellm fp32": t["fp32"], **{n: t[n] for n in names[1:]}}
              for r, t in tokens.items()}
    result["greedy_agreement"] = agreement(tokens, ["tessellm fp32"] + names[1:])
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
