"""What custom logits processors cost a step under async scheduling, on the CPU.

A tiny random llama (dummy weights), ``--batch`` greedy requests of ``--tokens`` tokens with
async scheduling, three ways: no processor, a processor that never reads output ids (vLLM's
``DummyLogitsProcessor``, half the rows forced), and one that reads them every step (an
``AdapterLogitsProcessor`` whose callable reads the prompt and output ids). Per way: wall time
per decode step, and how many times the sampling path waited for the step in flight (the
runner's ``resolve_all`` while a launched step was unresolved): on an accelerator each such
wait is a host sync that stalls the launch of the step's sampling until the step before
finished on the device. On the CPU the device is the host, so the time column shows the
processors' Python work, not the lost overlap; the wait count is what carries over.

    PYTHONPATH=. python benchmarks/cpu_logitsprocs_async.py --batch 16 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _model(path: str) -> str:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 2048,
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
              "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def run(path: str, procs: list, extra: dict, batch: int, tokens: int, repeat: int) -> dict:
    from tessellm import LLM, SamplingParams

    with LLM(path, device="cpu", dtype="float32", load_format="dummy",
             async_scheduling=True, num_kv_blocks=1024, seed=0, logits_processors=procs or None) as llm:
        steps = llm.engine.core.runner.steps
        waits = []
        resolve_all = steps.resolve_all

        def counted():
            waits.append(len(steps.unresolved))
            resolve_all()

        steps.resolve_all = counted
        prompts = [{"prompt_token_ids": [(7 * i + j) % 1900 + 3 for j in range(16)]} for i in range(batch)]
        params = [SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True,
                                 extra_args=extra if i % 2 == 0 else None) for i in range(batch)]
        llm.generate(prompts, params, use_tqdm=False)  # warm
        times = []
        for _ in range(repeat):
            waits.clear()
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        elapsed = min(times)
    return {"ms_per_step": round(1000 * elapsed / tokens, 3),
            "waits_for_step_in_flight": sum(1 for w in waits if w)}  # of the last run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="runs per way; the fastest is reported")
    args = p.parse_args()
    procs = "tests.sampling.logits_procs"
    with tempfile.TemporaryDirectory() as tmp:
        path = _model(os.path.join(tmp, "llama"))
        ways = {"none": ([], {}),
                "never reads output ids": ([f"{procs}:DummyLogitsProcessor"], {"target_token": 5}),
                "reads output ids": ([f"{procs}:AlternatingPerReqProcessor"], {"alternate": True})}
        for name, (procs_, extra) in ways.items():
            print(json.dumps({"way": name, **run(path, procs_, extra, args.batch, args.tokens, args.repeat)}))


if __name__ == "__main__":
    main()
