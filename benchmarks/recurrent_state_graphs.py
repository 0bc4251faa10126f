"""Decode-step time of the recurrent-state models with captured CUDA graphs on and off
(``enforce_eager``), on one GPU: random weights, token ids fed, no tokenizer.

Models (written to a temporary directory from transformers' config classes; shapes of the
public checkpoints as far as this benchmark needs them, ``--layers`` to shorten):

    mamba2     Mamba2ForCausalLM, mamba2-130m-like: hidden 768, 24 layers, heads 24 x 64,
               state 128, 1 group, vocab 50288
    granite4h  GraniteMoeHybridForCausalLM, Granite-4.0-H-micro-like (dense): hidden 2048,
               40 layers (every 10th attention), Mamba heads 64 x 64, state 128, 1 group,
               shared MLP 8192, vocab 100352

For each model, batch size and setting: an engine starts (``max_num_seqs`` = the batch), the
batch's prompts (``--input-len`` tokens) prefill, then ``--steps`` pure-decode engine steps run
synchronously (``async_scheduling`` off) between ``torch.cuda.synchronize`` calls: wall ms per
decode step, what a launch-bound step costs end to end. One JSON line per measurement::

    python benchmarks/recurrent_state_graphs.py --models mamba2 granite4h --batches 1 16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

os.environ.setdefault("TESSELLM_RECURRENT_STATE_GRAPHS", "1")  # Qwen3-Next's are off by default


def write_config(name: str, layers: int, root: str) -> str:
    from transformers import GraniteMoeHybridConfig, Mamba2Config

    if name == "mamba2":
        config = Mamba2Config(vocab_size=50288, hidden_size=768, num_hidden_layers=layers or 24,
                              num_heads=24, head_dim=64, expand=2, n_groups=1, state_size=128,
                              conv_kernel=4, chunk_size=256, tie_word_embeddings=True,
                              architectures=["Mamba2ForCausalLM"])
        # Mamba2 has no position limit; without this the engine's limit is 2048, short of the
        # 3000-token prompts of mprefix_ttft.py.
        config.max_position_embeddings = 4096
    elif name == "granite4h":
        n = layers or 40
        config = GraniteMoeHybridConfig(
            vocab_size=100352, hidden_size=2048, num_hidden_layers=n, num_attention_heads=16,
            num_key_value_heads=4, intermediate_size=8192, shared_intermediate_size=8192,
            num_local_experts=0, num_experts_per_tok=0, max_position_embeddings=4096,
            layer_types=["attention" if i % 10 == 9 else "mamba" for i in range(n)],
            mamba_n_heads=64, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128,
            mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256,
            position_embedding_type="nope", tie_word_embeddings=True,
            architectures=["GraniteMoeHybridForCausalLM"])
    else:
        raise SystemExit(f"unknown model {name!r}: mamba2 or granite4h")
    path = os.path.join(root, name)
    config.save_pretrained(path)
    return path


def decode_ms(path: str, batch: int, input_len: int, steps: int, eager: bool, dtype: str) -> dict:
    import torch

    from tessellm import LLM, SamplingParams
    from tessellm.sampling_params import RequestOutputKind  # FINAL_ONLY: steps build no per-step outputs

    t0 = time.perf_counter()
    with LLM(path, load_format="dummy", dtype=dtype, max_model_len=input_len + steps + 64,
             max_num_seqs=batch, enforce_eager=eager, async_scheduling=False) as llm:
        start_s = time.perf_counter() - t0
        eng, core = llm.engine, llm.engine.core
        assert (core.runner.graph_runner is None) == eager, "the graph setting was not taken"
        for i in range(batch):
            ids = [(7 * i + j) % 1000 + 10 for j in range(input_len)]
            eng.add_request(str(i), {"prompt_token_ids": ids},
                            SamplingParams(max_tokens=steps + 16, ignore_eos=True, temperature=0,
                                           output_kind=RequestOutputKind.FINAL_ONLY))
        while any(r.num_output_tokens == 0 for r in core.scheduler.running) or core.scheduler.waiting:
            eng.step()
        for _ in range(3):  # warm: the decode path's first calls
            eng.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t) * 1e3 / steps
        assert len(core.scheduler.running) == batch, "a request left before the timed steps ended"
    gc.collect()
    torch.cuda.empty_cache()
    return {"ms_per_decode_step": round(ms, 3), "engine_start_s": round(start_s, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["mamba2", "granite4h"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--layers", type=int, default=0, help="0: the model's own layer count")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    import torch

    device = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as root:
        for name in args.models:
            path = write_config(name, args.layers, root)
            for batch in args.batches:
                row = {"model": name, "batch": batch, "device": device, "dtype": args.dtype}
                for eager in (True, False):
                    r = decode_ms(path, batch, args.input_len, args.steps, eager, args.dtype)
                    row["eager" if eager else "graphs"] = r
                row["speedup"] = round(row["eager"]["ms_per_decode_step"]
                                       / row["graphs"]["ms_per_decode_step"], 2)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
