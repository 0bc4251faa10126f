"""KV connectors on a GPU (docs/kv_transfer.md): correctness, then disaggregated-prefill TTFT.

  python3 benchmarks/kvconn_gpu.py check             tiny random Llama (HF config) on cuda, float32:
      a producer engine saves a prompt's blocks as files (SharedStorageConnector), a consumer
      engine loads them; greedy tokens equal HF transformers' (on the cpu) and a plain run's;
      the consumer's cached tokens are 40 of 42.
  python3 benchmarks/kvconn_gpu.py ttft [TOKENS]     Llama-3.1-8B dummy weights, bf16, a TOKENS-long
      prompt (8000), max_tokens=1, two prompts per engine (run 2: pinned buffers cached): the
      latency without a connector (recompute), on the producer (prefill + saving its files: its
      output waits for them), on the consumer (loading them), with the GB/s each moved.
Files go under $KV_DIR (default: a fresh directory in /tmp); removed at the end.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time

import torch


def _kv(path: str, role: str) -> dict:
    return {"kv_connector": "SharedStorageConnector", "kv_role": role,
            "kv_connector_extra_config": {"shared_storage_path": path}}


def _store() -> str:
    root = os.environ.get("KV_DIR") or tempfile.gettempdir()
    return tempfile.mkdtemp(prefix="tessellm-kv-", dir=root)


def check() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tessellm import LLM, SamplingParams

    path = os.path.join(tempfile.mkdtemp(), "llama")
    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, initializer_range=0.25)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    hf.save_pretrained(path)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 384) for _ in range(42)] for _ in range(2)]
    hf.generation_config.eos_token_id = None
    want = []
    for x in prompts:
        ids = torch.tensor([x])
        want.append(hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                do_sample=False, pad_token_id=0)[0, len(x):].tolist())
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    store, got, cached = _store(), {}, {}
    for role in (None, "kv_producer", "kv_consumer"):
        with LLM(path, device=os.environ.get("DEVICE", "cuda"), dtype="float32", block_size=4,
                 num_kv_blocks=32, max_model_len=128,
                 kv_transfer_config=None if role is None else _kv(store, role)) as llm:
            outs = [llm.generate({"prompt_token_ids": x}, params, use_tqdm=False)[0] for x in prompts]
            got[role] = [list(o.outputs[0].token_ids) for o in outs]
            cached[role] = [o.num_cached_tokens for o in outs]
            print(f"{role}: cached tokens {cached[role]}, connector "
                  f"{llm.engine.core.scheduler.stats().kv_connector}")
    shutil.rmtree(store, ignore_errors=True)
    ok = got[None] == got["kv_producer"] == got["kv_consumer"] == want and cached["kv_consumer"] == [40, 40]
    print("CHECK", "PASS" if ok else f"FAIL: {got} hf {want}")


def ttft(tokens: int = 8000) -> None:
    from tessellm import LLM, SamplingParams

    model = os.environ.get("TTFT_MODEL", "benchmarks/model-configs/llama-3.1-8b")
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(tokens)] for _ in range(2)]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    store, base = _store(), {}
    for role in (None, "kv_producer", "kv_consumer"):
        with LLM(model, device=os.environ.get("DEVICE", "cuda"), load_format="dummy", dtype="bfloat16",
                 num_kv_blocks=2 * -(-tokens // 16) + 64, max_model_len=tokens + 64, enforce_eager=True,
                 kv_transfer_config=None if role is None else _kv(store, role)) as llm:
            llm.generate({"prompt_token_ids": [7] * 64}, params, use_tqdm=False)  # warm
            # Two prompts: the first run pays the first pinned buffers of its size (cudaHostAlloc),
            # the second finds them in torch's caching host allocator; the consumer reads files
            # the producer just wrote (the page cache is warm both times).
            for run, prompt in enumerate(prompts, 1):
                before = _store_bytes(store)
                t0 = time.perf_counter()
                out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
                dt = time.perf_counter() - t0
                moved = _store_bytes(store) - before if role == "kv_producer" else 0
                if role == "kv_consumer":
                    moved = out.num_cached_tokens // 16 * _store_bytes(store) // max(1, _files(store))
                if role is None:
                    base[run] = dt
                extra = ""
                if moved:
                    over = dt - base.get(run, 0.0)
                    extra = (f"; {moved / 2**30:.2f} GiB {'saved' if role == 'kv_producer' else 'loaded'}: "
                             f"{moved / dt / 1e9:.2f} GB/s over the whole TTFT, "
                             f"{'+' if over >= 0 else ''}{over * 1e3:.0f} ms vs recompute")
                print(f"TTFT {role} run {run}: {dt * 1e3:.0f} ms for {tokens} tokens "
                      f"(cached {out.num_cached_tokens}){extra}", flush=True)
            print(f"  connector {llm.engine.core.scheduler.stats().kv_connector}; store "
                  f"{_store_bytes(store) / 2**30:.2f} GiB in {_files(store)} files")
    shutil.rmtree(store, ignore_errors=True)


def _store_bytes(store: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store) for f in fs)


def _files(store: str) -> int:
    return sum(len(fs) for _, _, fs in os.walk(store))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "check"
    {"check": check, "ttft": lambda: ttft(int(sys.argv[2]) if len(sys.argv) > 2 else 8000)}[what]()
