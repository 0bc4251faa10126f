"""A captured decode step's GPU time with the decode micro-batch overlap on or off (run on the
GPU machine, one process per setting: the variable is read when the engine starts).

``--overlap 1`` sets ``TESSELLM_DECODE_OVERLAP=1`` (``_STEPS=decode``: the pure-decode halves;
``_MIN_ROWS`` to ``--min-rows``) before the engine starts. The batch's prompts prefill (those steps never split), then one synchronous
pure-decode step runs through the graph of its padded size: its logits (the graph's static
output) are saved to ``--logits-out`` (argmax and the first 2048 vocabulary columns of every
row), for ``--compare A B`` to set the two settings' logits side by side: the first decode
step's inputs are the same in both processes (same dummy weights, same prefill), so its
logits differ only by the split's arithmetic (bf16 GEMMs at half the rows). Then that graph
is replayed ``--iters`` times between CUDA events: GPU ms per decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/model-configs/llama-3.1-8b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens: the context")
    p.add_argument("--overlap", type=int, choices=(0, 1), default=0)
    p.add_argument("--min-rows", type=int, default=128)
    p.add_argument("--sm-carveout", type=int, default=None,
                   help="with --overlap 1: SMs the split step's GEMMs leave free (unset: none)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--output-json", default=None)
    p.add_argument("--logits-out", default=None)
    p.add_argument("--compare", nargs=2, default=None, metavar=("OFF", "ON"),
                   help="compare two --logits-out files and exit")
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    os.environ["TESSELLM_DECODE_OVERLAP"] = str(args.overlap)
    os.environ["TESSELLM_DECODE_OVERLAP_MIN_ROWS"] = str(args.min_rows)
    os.environ["TESSELLM_DECODE_OVERLAP_STEPS"] = "decode"  # this script times pure-decode halves
    if args.sm_carveout is not None:
        os.environ["TESSELLM_DECODE_OVERLAP_SM_CARVEOUT"] = str(args.sm_carveout)
    import torch

    from tessellm import LLM, SamplingParams
    from tessellm.sampling_params import RequestOutputKind  # FINAL_ONLY: steps build no per-step outputs

    t0 = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", max_model_len=args.input_len + 256,
              enable_prefix_caching=False, async_scheduling=False, max_num_seqs=args.batch)
    eng, core = llm.engine, llm.engine.core
    start_s = time.perf_counter() - t0
    assert (core.runner.overlap is not None) == bool(args.overlap), "overlap setting not taken"
    for i in range(args.batch):
        ids = [(7 * i + j) % 1000 + 10 for j in range(args.input_len)]
        eng.add_request(str(i), {"prompt_token_ids": ids},
                        SamplingParams(max_tokens=64, ignore_eos=True, temperature=0,
                                       output_kind=RequestOutputKind.FINAL_ONLY))
    while any(r.num_output_tokens == 0 for r in core.scheduler.running) or core.scheduler.waiting:
        eng.step()
    sched = core.scheduler.schedule()  # the first pure-decode step: every request decodes
    assert sum(sched.num_scheduled_tokens.values()) == args.batch, "not a pure-decode step"
    res = core.runner.execute(sched)
    eng.outputs.process(core.scheduler.update(sched, res.sampled))
    gr = core.runner.graph_runner
    graph, _, out = gr._graphs[gr.padded_size(args.batch)]
    torch.cuda.synchronize()
    logits = out[:args.batch].float()
    if args.logits_out:
        torch.save({"argmax": logits.argmax(-1).cpu(), "head": logits[:, :2048].cpu()}, args.logits_out)
    graph.replay()  # the same inputs again (the same KV slots rewritten): timing only
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    gpu_ms = start.elapsed_time(end) / args.iters
    result = {"batch": args.batch, "context": args.input_len, "overlap": args.overlap,
              "min_rows": args.min_rows, "sm_carveout": args.sm_carveout, "graph_gpu_ms_per_step": round(gpu_ms, 3),
              "engine_start_s": round(start_s, 1), "device": torch.cuda.get_device_name(),
              "decode_gemm": os.environ.get("TESSELLM_DECODE_GEMM", "")}
    print(json.dumps(result))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


def compare(off_path: str, on_path: str) -> None:
    import torch

    off, on = torch.load(off_path), torch.load(on_path)
    agree = (off["argmax"] == on["argmax"]).float().mean().item()
    diff = (off["head"] - on["head"]).abs()
    scale = off["head"].abs().max().item()
    print(json.dumps({"rows": int(off["argmax"].numel()), "argmax_agree": round(agree, 4),
                      "max_abs_diff": round(diff.max().item(), 5),
                      "mean_abs_diff": round(diff.mean().item(), 6), "max_abs_logit": round(scale, 4)}))


if __name__ == "__main__":
    main()
