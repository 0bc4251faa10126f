"""The host KV tier on a GPU (docs/kv_offload.md): correctness, copy bandwidth, TTFT.

  python3 benchmarks/kvoffload_gpu.py check            tiny random Llama (HF config) on cuda, float32:
      a prompt evicted from a 16-block cache comes back from the pinned host tier; greedy
      tokens equal HF transformers' (on the cpu) and a run without the tier; prints the tier's counters.
  python3 benchmarks/kvoffload_gpu.py bandwidth        swap_blocks (the reference) on Llama-3.1-8B's
      cache shape (32 layers, K+V, [blocks, 16, 8, 128] bf16: 2 MiB a block): GB/s device->host and
      back; then the engine's own path (HostKVBuffer.apply, side streams) for a reload step
      (512 blocks stored and 512 loaded, interleaved as the block manager lists them) and a
      load-only step.
  python3 benchmarks/kvoffload_gpu.py ttft [TOKENS]    Llama-3.1-8B dummy weights, bf16: a TOKENS-long
      prompt (8000), then another that evicts it, then the first again (max_tokens=1); the
      last one's latency with the tier (loaded) and without (recomputed).
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time

import torch


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
    p, q, r = ([rng.randrange(3, 384) for _ in range(42)] for _ in range(3))
    order = [p, q, r, p]
    hf.generation_config.eos_token_id = None
    want = []
    for x in order:
        ids = torch.tensor([x])
        want.append(hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                do_sample=False, pad_token_id=0)[0, len(x):].tolist())
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = {}
    for size in (None, 0.01):
        with LLM(path, device=os.environ.get("DEVICE", "cuda"), dtype="float32", block_size=4, num_kv_blocks=16,
                 max_model_len=128, kv_offloading_size=size) as llm:
            outs = [llm.generate({"prompt_token_ids": x}, params, use_tqdm=False)[0] for x in order]
            got[size] = [list(o.outputs[0].token_ids) for o in outs]
            host = llm.engine.core.kv.host
            pinned = (llm.engine.core.executor.worker.runner.host_kv.pinned
                      if host is not None else None)
            print(f"kv_offloading_size={size}: cached tokens {[o.num_cached_tokens for o in outs]}, "
                  f"tier {None if host is None else host.stats}, pinned {pinned}")
    ok = got[None] == got[0.01] == want and outs[3].num_cached_tokens == 40
    print("CHECK", "PASS" if ok else f"FAIL: with {got[0.01]} without {got[None]} hf {want}")


def bandwidth(blocks: int = 512, layers: int = 32) -> None:
    from tessellm.backends.reference.kv_transfer import swap_blocks

    shape = (2048, 16, 8, 128)
    dev = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(2 * layers)]
    host = [torch.empty((blocks, *shape[1:]), dtype=torch.bfloat16, pin_memory=True)
            for _ in range(2 * layers)]
    rng = random.Random(0)
    nbytes = sum(t[:blocks].numel() * 2 for t in dev)
    for name, scattered in (("contiguous", False), ("scattered", True)):
        ids = rng.sample(range(shape[0]), blocks) if scattered else list(range(blocks))
        stores = list(zip(ids, range(blocks)))
        loads = [(h, d) for d, h in stores]
        for label, pairs, a, b in (("device->host", stores, dev, host), ("host->device", loads, host, dev)):
            def run():
                for s, d in zip(a, b):
                    swap_blocks(s, d, pairs)
            _report(f"{name} {label}", run, nbytes, f"{blocks} blocks x {layers} layers")
    step(blocks, layers, dev)


def step(blocks: int, layers: int, dev: list) -> None:
    """The engine's path (``HostKVBuffer.apply``) for the step that reloads an evicted prompt:
    ``blocks`` loads, each into a fresh device block that evicts (stores) a cached one, listed
    store, load, store, load... as the block manager decides them."""
    from tessellm.backends.reference.kv_transfer import swap_blocks
    from tessellm.core.host_kv_buffer import HostKVBuffer
    from tessellm.core.kv_offload import LOAD, STORE

    buf = HostKVBuffer(dev, 2 * blocks, True, None)
    nbytes = sum(t[:blocks].numel() * 2 for t in dev)
    transfers = [t for i in range(blocks) for t in ((STORE, 2 * i + 1, blocks + i), (LOAD, i, 2 * i + 1))]
    before = buf.copy_calls
    buf.apply(transfers, dev, swap_blocks)
    calls = buf.copy_calls - before
    _report(f"reload step ({calls} copy calls)", lambda: buf.apply(transfers, dev, swap_blocks),
            2 * nbytes, f"{blocks} blocks stored + {blocks} loaded x {layers} layers")
    buf.apply(transfers[1::2], dev, swap_blocks)
    _report("load-only step", lambda: buf.apply(transfers[1::2], dev, swap_blocks), nbytes,
            f"{blocks} blocks loaded x {layers} layers")


def _report(label: str, run, nbytes: int, what: str) -> None:
    for _ in range(2):  # warm
        run()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e8))  # ~0.1 s of queued work: a host sync in the copies would wait it out
    t0 = time.perf_counter()
    run()
    queued = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 5
    print(f"BANDWIDTH {label}: {what} ({nbytes / 2**20:.0f} MiB) in {dt * 1e3:.1f} ms = "
          f"{nbytes / dt / 1e9:.1f} GB/s; the host queued them in {queued * 1e3:.1f} ms behind "
          f"~100 ms of device work (near 100 ms or more: a host sync)", flush=True)


def ttft(tokens: int = 8000) -> None:
    from tessellm import LLM, SamplingParams

    model = "benchmarks/model-configs/llama-3.1-8b"
    rng = random.Random(0)
    p, q = ([rng.randrange(1000, 100000) for _ in range(tokens)] for _ in range(2))
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    blocks = -(-tokens // 16) + 40  # one prompt at a time: the second evicts the first
    # LLM(...) skips kernel warm-up by default (kernel_warmup=None: on when serving), so Triton
    # compiles what the first requests meet "after the engine was ready": expected here, not a
    # hole. KVO_WARMUP=1 warms up as a server does; then a compile after ready is a hole.
    warm = os.environ.get("KVO_WARMUP") == "1"
    for size in (None, 4):
        with LLM(model, device="cuda", load_format="dummy", dtype="bfloat16", num_kv_blocks=blocks,
                 max_model_len=tokens + 64, kv_offloading_size=size, enforce_eager=True,
                 kernel_warmup=warm or None) as llm:
            llm.generate({"prompt_token_ids": [7] * 64}, params, use_tqdm=False)  # warm
            times = []
            for x in (p, q, p):
                t0 = time.perf_counter()
                out = llm.generate({"prompt_token_ids": x}, params, use_tqdm=False)[0]
                times.append(time.perf_counter() - t0)
            host = llm.engine.core.kv.host
            print(f"TTFT kv_offloading_size={size}: P {times[0] * 1e3:.0f} ms, Q {times[1] * 1e3:.0f} ms, "
                  f"P again {times[2] * 1e3:.0f} ms (cached {out.num_cached_tokens} tokens)"
                  + ("" if host is None else f"; loaded {host.stats.bytes_loaded / 2**30:.2f} GiB, "
                     f"stored {host.stats.bytes_stored / 2**30:.2f} GiB in "
                     f"{llm.engine.core.runner.host_kv.copy_calls} copy calls"))
    if warm:
        from tessellm.metrics.compile_counter import COUNTER

        print(f"WARMUP Triton compilations after ready: {COUNTER.after_ready} (0: no warm-up hole "
              f"for these shapes, the tier's reload step included)")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "check"
    {"check": check, "bandwidth": bandwidth,
     "ttft": lambda: ttft(int(sys.argv[2]) if len(sys.argv) > 2 else 8000)}[what]()
