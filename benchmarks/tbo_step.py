"""One mixed (chunked-prefill) step's GPU time, unsplit against the decode overlap's mixed split
at several GEMM SM carve-outs, in one process (run on the GPU machine; ``tbo_device.sh``).

The step is built by hand on an engine with dummy weights (no scheduler): D decode rows of
``--context`` keys each (their KV blocks distinct) followed by ``--prompts`` fresh prompts of
``--prompt-len`` tokens, the order of ``AttentionBatch`` (decodes first). Every setting runs the
model's forward on that same step (eager, as the engine runs mixed steps; the KV slots it
writes are the same each time), the split's metadata built inside the timed loop as the runner
builds it each step:

    prefill_only   the prompts alone (a lower bound for the split: its GEMMs must run anyway)
    decode_only    the D decodes alone
    decode_attention  the D decodes' attention alone, every layer (cache write included): what
                   the split can hide at best, so serial - decode_attention is its ideal
    serial         the whole step, unsplit (today's engine)
    overlap_cN     the mixed split (decodes | prompts, the decodes' attention on the side
                   stream beside the prompts' GEMMs), GEMMs carved out by N SMs; "none": not
                   carved (cuBLAS's default path)
    prio_cN        the best overlap_cN again with a high-priority side stream (CUDA priority
                   -1; the engine's side stream has the default priority)

Printed per D: one JSON line per setting (``gpu_ms``: CUDA events around ``--iters`` forwards,
per forward; ``host_ms``: the host's time to queue one forward on an idle GPU; near or above
``gpu_ms`` means the step is host-bound and the GPU figures say little), then ``SUMMARY D=..
P=..: serial .. ms, best overlap_cN .. ms (serial / best), prefill_only .. + decode_only ..,
ideal ..``: ideal = serial - decode_attention (every decode attention hidden, nothing else
lost). Last, ``BEST_CARVEOUT=N`` (or none) of the first D, for the caller's F runs.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Optional


def build_step(d: int, prompts: int, prompt_len: int, context: int, width: int, device,
               vocab: int = 1000):
    """``(input_ids, positions, AttentionBatch)`` of the mixed step (blocks of 16 tokens)."""
    import torch

    from tessellm.core.attention_batch import AttentionBatch

    bs, nxt = 16, 1
    tables = torch.zeros(d + prompts, width, dtype=torch.int32)
    positions, slots, lens, qsl = [], [], [], [0]
    for s in range(d + prompts):
        n = context if s < d else prompt_len
        blocks = list(range(nxt, nxt + -(-n // bs)))
        nxt += len(blocks)
        tables[s, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        rows = [n - 1] if s < d else list(range(n))
        positions += rows
        slots += [blocks[p // bs] * bs + p % bs for p in rows]
        lens.append(n)
        qsl.append(qsl[-1] + len(rows))
    n_tok = qsl[-1]
    put = lambda x, t: torch.tensor(x, dtype=t, device=device)  # noqa: E731
    batch = AttentionBatch(num_tokens=n_tok, num_seqs=d + prompts, num_decodes=d,
                           query_start_loc=put(qsl, torch.int32), seq_lens=put(lens, torch.int32),
                           block_tables=tables.to(device), slot_mapping=put(slots, torch.int64),
                           max_query_len=prompt_len, max_seq_len=max(lens),
                           query_start_loc_host=qsl, seq_lens_host=lens)
    ids = torch.randint(0, min(vocab, 1000), (n_tok,), device=device)
    return ids, put(positions, torch.int64), batch, nxt


def time_forward(runner, ids, positions, batch, iters: int, split: bool) -> dict:
    import torch

    def once():
        md = runner._metadata(batch) if split else runner.kernel.build_metadata(batch)
        return runner.model(ids, positions, md)

    for _ in range(2):  # JIT compiles, workspaces
        once()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    once()  # from an idle GPU: the host's queuing time of one forward
    host = time.perf_counter() - t0
    return {"gpu_ms": _gpu_ms(once, iters), "host_ms": round(host * 1e3, 3)}


def time_graph(runner, ids, positions, batch, iters: int, split: bool) -> dict:
    """The same forward captured once in a CUDA graph (its metadata, and the split, built
    before the capture) and replayed: the step's GPU time without the host's launch cost,
    which bounds the eager split (``--graph``). ``graph_gpu_ms`` None and ``graph_error`` where
    the step cannot be captured."""
    import torch

    md = runner._metadata(batch) if split else runner.kernel.build_metadata(batch)

    def run():
        return runner.model(ids, positions, md)

    graph = None
    try:
        side = torch.cuda.Stream()  # warm-up off the default stream, as torch's capture wants
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graph.replay()
        return {"graph_gpu_ms": _gpu_ms(graph.replay, iters)}
    except Exception as exc:  # noqa: BLE001 - a step that cannot be captured: say why
        torch.cuda.synchronize()
        return {"graph_gpu_ms": None, "graph_error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        del graph
        torch.cuda.synchronize()


def _gpu_ms(once, iters: int) -> float:
    """``once()`` queued ``iters`` times back to back from an idle GPU: its time a call (ms,
    between two events on the stream; where the host queues slower than the GPU runs, the gaps
    are in it: a launch-bound step reads about its ``host_ms``)."""
    import torch

    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        once()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / iters, 3)


def time_decode_attention(runner, positions, batch, iters: int) -> dict:
    """The decodes' attention alone (every layer's ``attend`` on fixed q, k, v, the cache
    write included): the part of the step the mixed split can hide."""
    import torch

    model = runner.model
    layers = [model.layers[i] for i in range(model.start_layer, model.end_layer)]
    md = runner.kernel.build_metadata(batch)
    hidden = torch.randn(batch.num_tokens, model.embed_tokens.weight.shape[1],
                         device=positions.device, dtype=runner.dtype)
    qkv = [layer.self_attn.project(positions, hidden) for layer in layers]

    def once():
        for layer, (q, k, v) in zip(layers, qkv):
            layer.self_attn.attend(positions, q, k, v, md)

    once()
    return {"gpu_ms": _gpu_ms(once, iters), "host_ms": None}


def overlap_on(runner, carveout: Optional[int], priority: Optional[int] = None) -> None:
    """The runner's mixed split at this carve-out (and, given, side-stream priority)."""
    from tessellm.core.decode_overlap import DecodeOverlap, OverlapSettings

    runner.overlap = DecodeOverlap.build(runner, OverlapSettings(
        min_rows=1, sm_carveout=carveout, steps="mixed", min_prefill=1))
    if priority is not None:  # CUDA streams: lower is higher
        from tessellm.backends.cuda.streams import CudaOverlapStreams

        runner.overlap.streams = CudaOverlapStreams(runner.device, priority=priority)


def sweep(runner, d: int, args, carves: list) -> tuple[dict, int]:
    """Every setting's timing for D = ``d`` decodes; and the step's prefill tokens."""
    from tessellm.core.decode_overlap import sequences

    width = -(-runner.max_model_len // 16)
    ids, pos, batch, _ = build_step(d, args.prompts, args.prompt_len, args.context, width,
                                    runner.device, runner.vocab_size)
    t, n = batch.query_start_loc_host[d], args.iters
    pre, dec = sequences(batch, d, batch.num_seqs), sequences(batch, 0, d)
    def timed(ids, pos, batch, split: bool) -> dict:
        row = time_forward(runner, ids, pos, batch, n, split)
        if args.graph:
            row.update(time_graph(runner, ids, pos, batch, n, split))
        return row

    rows = {"prefill_only": timed(ids[t:], pos[t:], pre, False),
            "decode_only": timed(ids[:t], pos[:t], dec, False),
            "decode_attention": time_decode_attention(runner, pos[:t], dec, n),
            "serial": timed(ids, pos, batch, False)}
    for c in carves:
        overlap_on(runner, c)
        assert runner.overlap.split(batch, runner.model) is not None
        rows[f"overlap_c{'none' if c is None else c}"] = timed(ids, pos, batch, True)
    # the best carve-out again with a high-priority side stream (its CTAs scheduled first as
    # the GEMMs' retire): whether a priority knob would be worth having
    c = _best(rows).removeprefix("overlap_c")
    if hasattr(runner.overlap.streams, "stream"):  # CUDA streams only
        overlap_on(runner, None if c == "none" else int(c), priority=-1)
        rows[f"prio_c{c}"] = timed(ids, pos, batch, True)
    runner.overlap = None
    return rows, batch.num_tokens - d


def _best(rows: dict) -> str:
    return min((k for k in rows if k.startswith("overlap")), key=lambda k: rows[k]["gpu_ms"])


def summary(d: int, p: int, rows: dict) -> str:
    best, serial = _best(rows), rows["serial"]["gpu_ms"]
    prio = next((k for k in rows if k.startswith("prio")), None)
    return (f"SUMMARY D={d} P={p}: serial {serial} ms, best {best} {rows[best]['gpu_ms']} ms "
            f"({serial / rows[best]['gpu_ms']:.3f}x), prefill_only {rows['prefill_only']['gpu_ms']} "
            f"+ decode_only {rows['decode_only']['gpu_ms']}, ideal (serial - decode_attention) "
            f"{serial - rows['decode_attention']['gpu_ms']:.3f}"
            + (f"; high-priority side stream {rows[prio]['gpu_ms']} ms" if prio else "")
            + ("; graphs (no launch cost): " + ", ".join(
                f"{k} {r['graph_gpu_ms']}" for k, r in rows.items() if "graph_gpu_ms" in r)
               if any("graph_gpu_ms" in r for r in rows.values()) else ""))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/model-configs/llama-3.1-8b")
    p.add_argument("--decodes", type=int, nargs="+", default=[256, 128])
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=384)
    p.add_argument("--context", type=int, default=640, help="keys of each decode row")
    p.add_argument("--carveouts", default="none,0,16,32,48", help="comma list; none: not carved")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--output-json", default=None)
    p.add_argument("--graph", action="store_true",
                   help="also time each setting's forward captured in a CUDA graph (graph_gpu_ms: "
                        "the GPU time without the host's launch cost)")
    args = p.parse_args()
    import torch

    from tessellm import LLM

    max_len = max(args.context, args.prompt_len) + 64
    blocks = max(args.decodes) * -(-args.context // 16) + args.prompts * -(-args.prompt_len // 16)
    llm = LLM(args.model, load_format="dummy", enforce_eager=True, max_model_len=max_len,
              enable_prefix_caching=False, num_kv_blocks=blocks + 64,
              max_num_seqs=max(args.decodes) + 8)
    runner = llm.engine.core.runner
    carves = [None if c == "none" else int(c) for c in args.carveouts.split(",")]
    results, best = [], None
    with torch.inference_mode():
        for d in args.decodes:
            rows, prefill = sweep(runner, d, args, carves)
            for name, r in rows.items():
                line = {"decodes": d, "prompt_tokens": prefill, "context": args.context,
                        "setting": name, **r}
                results.append(line)
                print(json.dumps(line))
            print(summary(d, prefill, rows))
            best = best or _best(rows).removeprefix("overlap_c")
    print("BEST_CARVEOUT=" + best)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "carveout_supported": hasattr(torch._C, "_set_sm_carveout_experimental"),
           "results": results}
    print(json.dumps({k: v for k, v in out.items() if k != "results"}))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
