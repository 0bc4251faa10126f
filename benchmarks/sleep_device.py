"""Sleep mode on a GPU (benchmarks/sleep_device.sh): correctness on a tiny float32 Llama with CUDA
graphs (same greedy tokens after sleep(1)/wake_up, after sleep(2) + load_weights(original), HF's
tokens after load_weights(perturbed)), then on Llama-3.1-8B shapes (dummy bf16 weights) the
device memory each level frees and what sleep / wake_up take. Prints one line per check and
exits 1 on a failed one."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import torch

from tessellm import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 5, 9, 22, 33, 44, 55, 66, 77, 88, 99, 100, 120, 130, 140, 150, 160, 170], [3, 4, 5, 6]]
DEVICE = os.environ.get("SLEEP_DEVICE", "cuda")  # cpu: a dry run of the correctness part
failed = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        failed.append(name)


def tokens(llm) -> list:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def hf_tokens(path: str) -> list:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE)
    hf.generation_config.eos_token_id = None
    out = []
    for p in PROMPTS:
        x = torch.tensor([p], device=DEVICE)
        ids = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=GREEDY.max_tokens,
                          do_sample=False, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def tiny_models(root: str) -> tuple[str, str]:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, initializer_range=0.25)
    torch.manual_seed(1234)
    a, b = os.path.join(root, "a"), os.path.join(root, "b")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(a)
    shutil.copytree(a, b)
    torch.manual_seed(7)
    w = {k: v + 0.05 * torch.randn_like(v) for k, v in load_file(os.path.join(a, "model.safetensors")).items()}
    save_file(w, os.path.join(b, "model.safetensors"), metadata={"format": "pt"})
    return a, b


def correctness(root: str) -> None:
    a, b = tiny_models(root)
    expected, updated = hf_tokens(a), hf_tokens(b)
    with LLM(a, device=DEVICE, dtype="float32", num_kv_blocks=256, enable_sleep_mode=True,
             max_num_seqs=8) as llm:
        runner = llm.engine.core.runner
        check("graphs captured", runner._graphs_ready or DEVICE == "cpu")
        check("tokens == HF", tokens(llm) == expected)
        llm.sleep(1)
        check("weights freed", sum(p.untyped_storage().nbytes() for p in runner.model.parameters()) == 0)
        llm.wake_up()
        check("graphs captured again", runner._graphs_ready or DEVICE == "cpu")
        check("sleep(1)+wake_up tokens == HF", tokens(llm) == expected)
        llm.sleep(2)
        llm.wake_up(["weights"])
        from safetensors.torch import load_file

        llm.load_weights(load_file(os.path.join(a, "model.safetensors")).items())
        llm.wake_up(["kv_cache"])
        check("sleep(2)+load_weights(original) tokens == HF", tokens(llm) == expected)
        llm.load_weights(path=b)
        check("load_weights(perturbed) tokens == HF on them (graphs kept)", tokens(llm) == updated)


def memory() -> None:
    cfgs = os.path.join(os.path.dirname(__file__), "model-configs", "llama-3.1-8b")
    with LLM(cfgs, load_format="dummy", dtype="bfloat16", enable_sleep_mode=True, max_model_len=4096,
             gpu_memory_utilization=0.8, max_num_seqs=64) as llm:
        backend = llm.engine.core.backend
        tokens(llm)
        for level in (1, 2):
            free0, total = backend.memory_info()
            t0 = time.perf_counter()
            report = llm.engine.core.sleep(level)
            t1 = time.perf_counter()
            free1, _ = backend.memory_info()
            llm.wake_up()
            t2 = time.perf_counter()
            print(f"8B bf16 level {level}: freed {(free1 - free0) / 2**30:.1f} GiB of {total / 2**30:.0f} "
                  f"(offloaded {report['offloaded_bytes'] / 2**30:.1f}, discarded "
                  f"{report['discarded_bytes'] / 2**30:.1f}, KV {report['kv_cache_bytes'] / 2**30:.1f}, "
                  f"kept {report['kept_bytes']}); sleep {t1 - t0:.2f} s, wake_up (with graph "
                  f"capture) {t2 - t1:.2f} s", flush=True)
            check(f"level {level} frees >= 90% of weights+KV",
                  free1 - free0 >= 0.9 * (report["offloaded_bytes"] + report["discarded_bytes"]
                                          + report["kv_cache_bytes"]))
        tokens(llm)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as root:
        correctness(root)
    if DEVICE != "cpu":
        memory()
    sys.exit(1 if failed else 0)
