"""KV connectors on a GPU (docs/kv_transfer.md): correctness, then disaggregated-prefill TTFT.

  python3 benchmarks/kvconn_gpu.py check             tiny random Llama (HF config) on cuda, float32:
      a producer engine saves a prompt's blocks as files (SharedStorageConnector), a consumer
      engine loads them; greedy tokens equal HF transformers' (on the cpu) and a plain run's;
      the consumer's cached tokens are 40 of 42.
  python3 benchmarks/kvconn_gpu.py ttft [TOKENS]     Llama-3.1-8B dummy weights, bf16, a TOKENS-long
      prompt (8000), max_tokens=1, two prompts per engine (run 2: pinned buffers cached): the
      latency without a connector (recompute), on the producer (prefill + saving its files: its
      response does not wait for them; printed: when they landed), on the consumer (loading
      them in the background), with the GB/s each moved. TTFT: until an engine step returned
      the request's token (what a server's client sees), not until LLM.generate returned
      (that waits for the producer's saves to be written and counted).
  python3 benchmarks/kvconn_gpu.py overlap [TOKENS] a request decoding while a TOKENS-long prompt
      arrives: recomputed, loaded in the admitting step, loaded in the background; the
      decoding request's largest inter-token gap meanwhile and the long prompt's TTFT.
  python3 benchmarks/kvconn_gpu.py peer [TOKENS]    ZmqPeerConnector: a producer engine in a
      second process (same GPU) prefills two TOKENS-long prompts and serves their KV from host
      memory over loopback TCP; this process's consumer engine loads each (TTFT, GB/s), and
      recomputes a third prompt the producer never saw (the baseline, same engine).
Files go under $KV_DIR (default: a fresh directory in /tmp); removed at the end. TTFT_MODEL
(default the Llama-3.1-8B config, dummy weights) and DEVICE (default cuda) pick another model
and device (a smoke run on the cpu: DEVICE=cpu TTFT_MODEL=<tiny model dir> ... peer 200).
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
                out, dt, settled = _first_token(llm, f"{role}-{run}", prompt, params)
                landed = ""
                if role == "kv_producer":  # the response does not wait for the files: when did they land?
                    landed = (f"; files written {settled * 1e3:.0f} ms after it (LLM.generate "
                              "returns then: its stats count them)")
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
                      f"(cached {out.num_cached_tokens}){extra}{landed}", flush=True)
            print(f"  connector {llm.engine.core.scheduler.stats().kv_connector}; store "
                  f"{_store_bytes(store) / 2**30:.2f} GiB in {_files(store)} files")
    shutil.rmtree(store, ignore_errors=True)


def _first_token(llm, rid: str, prompt: list, params) -> tuple:
    """The request through the engine's steps: its output, the time until a step returned it
    (the TTFT a server's client sees: max_tokens=1), and how long after that the engine had
    nothing left under way (a producer's saves written and counted; ``LLM.generate`` returns
    only then, so timing generate would count the files' writes in the TTFT)."""
    engine = llm.engine
    t0 = time.perf_counter()
    engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    out = None
    while out is None:
        out = next((o for o in engine.step() if o.request_id == rid and o.finished), None)
    dt = time.perf_counter() - t0
    while engine.has_unfinished_requests():
        engine.step()
    return out, dt, time.perf_counter() - t0 - dt


def overlap(tokens: int = 8000) -> None:
    """A request decoding while another's TOKENS-long prompt arrives, on three consumer
    engines: without a connector (the prompt is prefilled), loading its KV in the step that
    admits it (load_async false), and loading it in the background (the default). Prints the
    decoding request's inter-token gaps (median before, max while the long prompt is served)
    and the long prompt's TTFT."""
    from tessellm import LLM, SamplingParams

    model = os.environ.get("TTFT_MODEL", "benchmarks/model-configs/llama-3.1-8b")
    rng = random.Random(1)
    long_prompt = [rng.randrange(1000, 100000) for _ in range(tokens)]
    short = [rng.randrange(1000, 100000) for _ in range(32)]
    store = _store()
    engine_args = dict(device=os.environ.get("DEVICE", "cuda"), load_format="dummy", dtype="bfloat16",
                       num_kv_blocks=2 * -(-tokens // 16) + 256, max_model_len=tokens + 512,
                       enforce_eager=True)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    with LLM(model, kv_transfer_config=_kv(store, "kv_producer"), **engine_args) as llm:
        llm.generate({"prompt_token_ids": long_prompt}, one, use_tqdm=False)
    for name, load_async in (("recompute", None), ("load in step", False), ("load in background", True)):
        kv = None
        if load_async is not None:
            kv = _kv(store, "kv_consumer")
            kv["kv_connector_extra_config"]["load_async"] = load_async
        with LLM(model, kv_transfer_config=kv, **engine_args) as llm:
            llm.generate({"prompt_token_ids": [7] * 64}, one, use_tqdm=False)  # warm
            engine = llm.engine
            engine.add_request("d", {"prompt_token_ids": short},
                               SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
            sched, did = engine.core.scheduler, engine.outputs.core_ids("d")[0]
            stamps, added, done, seen = [], None, None, 0
            while engine.has_unfinished_requests():
                outs = engine.step()  # final outputs only: d's tokens from the scheduler
                now = time.perf_counter()
                d = sched.requests.get(did)
                if d is not None and d.num_output_tokens > seen:
                    seen = d.num_output_tokens
                    stamps.append(now)
                if any(o.request_id == "l" and o.finished for o in outs):
                    done = now
                if added is None and len(stamps) == 40:
                    engine.add_request("l", {"prompt_token_ids": long_prompt}, one)
                    added = now
                if done is not None and len(stamps) > 40 and stamps[-1] > done + 0.2:
                    engine.abort_request("d")
                    break
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            before = sorted(g for g, t in zip(gaps, stamps[1:]) if t <= added)
            during = [g for g, t in zip(gaps, stamps[1:]) if added < t <= (done or t) + 1e-3]
            print(f"OVERLAP {name}: decode gap median {before[len(before) // 2] * 1e3:.1f} ms before, "
                  f"max {max(during or [0]) * 1e3:.0f} ms while the {tokens}-token prompt is served "
                  f"({len(during)} tokens then); its TTFT {(done - added) * 1e3:.0f} ms", flush=True)
    shutil.rmtree(store, ignore_errors=True)


def _peer_engine(tokens: int) -> dict:
    device = os.environ.get("DEVICE", "cuda")
    return dict(device=device, load_format="dummy", dtype="bfloat16" if device != "cpu" else "float32",
                num_kv_blocks=3 * -(-tokens // 16) + 64, max_model_len=tokens + 64,
                enforce_eager=True)


def _peer_prompts(tokens: int) -> list:
    rng = random.Random(2)
    return [[rng.randrange(1000, 30000) for _ in range(tokens)] for _ in range(3)]


def peer_producer(tokens: int, port: int) -> None:
    """The producer of ``peer``: prefills the first two prompts, says so, serves until stdin closes."""
    from tessellm import LLM, SamplingParams

    model = os.environ.get("TTFT_MODEL", "benchmarks/model-configs/llama-3.1-8b")
    kv = {"kv_connector": "ZmqPeerConnector", "kv_role": "kv_producer",
          "kv_connector_extra_config": {"kv_port": port, "wait_for_save": True}}
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    with LLM(model, kv_transfer_config=kv, **_peer_engine(tokens)) as llm:
        llm.generate({"prompt_token_ids": [7] * 64}, one, use_tqdm=False)  # warm
        firsts = []
        for run, prompt in enumerate(_peer_prompts(tokens)[:2], 1):
            t0 = time.perf_counter()
            out = llm.generate({"prompt_token_ids": prompt}, one, use_tqdm=False)[0]
            firsts.append(out.outputs[0].token_ids[0])
            print(f"PEER producer run {run}: {(time.perf_counter() - t0) * 1e3:.0f} ms (prefill, "
                  "blocks in its store before the response)", flush=True)
        print(f"  producer connector {llm.engine.core.scheduler.stats().kv_connector}")
        print(f"READY {' '.join(map(str, firsts))}", flush=True)
        sys.stdin.readline()


def peer(tokens: int = 8000) -> None:
    import socket
    import subprocess

    from tessellm import LLM, SamplingParams

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "peer_producer", str(tokens), str(port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            print(line.rstrip(), flush=True)
            if line.startswith("READY"):
                want = [int(x) for x in line.split()[1:]]
                break
        else:
            raise SystemExit(f"the producer process ended ({proc.wait()}) before it was ready")
        model = os.environ.get("TTFT_MODEL", "benchmarks/model-configs/llama-3.1-8b")
        kv = {"kv_connector": "ZmqPeerConnector", "kv_role": "kv_consumer",
              "kv_connector_extra_config": {"kv_peer": f"127.0.0.1:{port}"}}
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        with LLM(model, kv_transfer_config=kv, **_peer_engine(tokens)) as llm:
            llm.generate({"prompt_token_ids": [7] * 64}, one, use_tqdm=False)  # warm
            block_bytes = llm.engine.core.executor.worker.runner.kv_connector.block_bytes
            bs = llm.engine.core.info.block_size
            got = []
            for name, prompt in zip(("load 1", "load 2", "recompute"), _peer_prompts(tokens)):
                t0 = time.perf_counter()
                out = llm.generate({"prompt_token_ids": prompt}, one, use_tqdm=False)[0]
                dt = time.perf_counter() - t0
                got.append(out.outputs[0].token_ids[0])
                moved = out.num_cached_tokens // bs * block_bytes
                rate = f"; {moved / 2**20:.1f} MiB over TCP: {moved / dt / 1e9:.2f} GB/s" if moved else ""
                print(f"PEER consumer {name}: TTFT {dt * 1e3:.0f} ms for {tokens} tokens "
                      f"(cached {out.num_cached_tokens}){rate}", flush=True)
            print(f"  consumer connector {llm.engine.core.scheduler.stats().kv_connector}")
            print("PEER first tokens", "equal the producer's" if got[:2] == want else
                  f"DIFFER: consumer {got[:2]}, producer {want}", flush=True)
    finally:
        proc.stdin.close()
        proc.wait(120)


def _store_bytes(store: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store) for f in fs)


def _files(store: str) -> int:
    return sum(len(fs) for _, _, fs in os.walk(store))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "check"
    arg = int(sys.argv[2]) if len(sys.argv) > 2 else 8000
    {"check": check, "ttft": lambda: ttft(arg), "overlap": lambda: overlap(arg),
     "peer": lambda: peer(arg),
     "peer_producer": lambda: peer_producer(arg, int(sys.argv[3]))}[what]()
