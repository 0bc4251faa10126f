"""Cost of the model-based proposers on Llama-3.1-8B shapes with random weights (B1 shape).

For each method (``plain``: no speculation; ``draft_model``: a Llama-3.2-1B-shaped draft;
``eagle`` / ``eagle3``: one-layer heads of 8B shapes; ``mtp``: the target's own MTP layer, with
``--target glm-4.5-air-4l``), one engine in this process runs one
request (``--prompt-len`` random prompt tokens, ``--output-len`` greedy tokens, EOS ignored)
and reports:

* ``b1_ms_per_token``: (time for all tokens - time for the first) / (output_len - 1);
* ``propose_ms``: mean wall time of a ``propose`` call that drafted (the first forward over
  the step's new tokens plus K-1 one-token draft steps, synchronised at the end);
* ``ms_per_draft_step``: ``propose_ms / K``.

Random weights accept almost nothing, so this measures what drafting *costs*, not what it
saves (the replay proposer in benchmarks/spec_decode.sh measures the verify path's ceiling).
``benchmarks/spec_draft.sh`` runs it time-boxed; ``benchmarks/spec_decode.py draft`` calls ``run()``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

CONFIGS = "benchmarks/model-configs"
HEADS = {"draft_model": "llama-3.2-1b", "eagle": "eagle-llama-3.1-8b", "eagle3": "eagle3-llama-3.1-8b"}


def run(methods: str = "plain draft_model eagle eagle3", k: int = 3, prompt_len: int = 512,
        output_len: int = 256, device: str = "auto", configs: str = CONFIGS,
        output_json: str | None = None, target: str = "llama-3.1-8b") -> dict:
    """Every method in turn (``benchmarks/spec_decode.py draft`` calls this with defaults)."""
    results = []
    for method in methods.split():
        t0 = time.perf_counter()
        r = run_method(method, k, prompt_len, output_len, device, configs, target)
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(r), flush=True)
        results.append(r)
        if output_json:  # after each method: a time box that ends the run keeps the rest
            with open(output_json, "w") as f:
                json.dump(results, f, indent=2)
    return {"draft": results}


def run_method(method: str, k: int, prompt_len: int, output_len: int, device: str,
               configs: str = CONFIGS, target: str = "llama-3.1-8b") -> dict:
    from tessellm import LLM
    from tessellm.core.sampling_params import SamplingParams

    spec = None
    if method == "mtp":  # the target's own MTP layer (a target config with num_nextn_predict_layers)
        spec = {"method": "mtp", "num_speculative_tokens": k, "draft_load_format": "dummy",
                "disable_by_batch_size": 0}
    elif method != "plain":
        spec = {"method": method, "model": os.path.join(configs, HEADS[method]),
                "num_speculative_tokens": k, "draft_load_format": "dummy", "disable_by_batch_size": 0}
    llm = LLM(os.path.join(configs, target), device=device, load_format="dummy",
              max_model_len=2048, max_num_seqs=8, enable_prefix_caching=False, speculative_config=spec)
    try:
        times = _time_proposals(llm) if spec else []
        gen = torch.Generator().manual_seed(0)
        vocab = llm.engine.core.vocab_size
        prompt = {"prompt_token_ids": torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()}

        def generate(n: int) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
            t0 = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            return time.perf_counter() - t0

        generate(16)  # warm-up
        first = min(generate(1) for _ in range(2))
        times.clear()
        total = generate(output_len)
        result = {"method": method, "k": k if spec else 0, "prompt_len": prompt_len,
                  "output_len": output_len, "ttft_ms": round(first * 1e3, 2),
                  "b1_ms_per_token": round((total - first) / (output_len - 1) * 1e3, 3)}
        if spec:
            mean = sum(times) / len(times) if times else float("nan")
            result.update(propose_ms=round(mean * 1e3, 3), ms_per_draft_step=round(mean / k * 1e3, 3),
                          proposals=len(times), graphs=_graphs(llm),
                          spec_decode=llm.engine.core.scheduler.spec_stats.as_dict())
        return result
    finally:
        llm.shutdown()


def _time_proposals(llm) -> list[float]:
    """Wrap the in-process proposer's ``propose``: wall time of each call that drafted."""
    proposer = llm.engine.core.runner.spec.proposer
    inner, times = proposer.propose, []

    def timed(inp):
        t0 = time.perf_counter()
        out = inner(inp)
        if out.token_ids:  # it synchronised on its drafts (one .tolist() at the end)
            times.append(time.perf_counter() - t0)
        return out

    proposer.propose = timed
    return times


def _graphs(llm) -> bool:
    proposer = llm.engine.core.runner.spec.proposer
    return getattr(proposer, "graph_runner", None) is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="plain draft_model eagle eagle3")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--output-json", default=None)
    ap.add_argument("--configs", default=CONFIGS, help="a folder with llama-3.1-8b/ and the heads' "
                    "folders (a cpu smoke run points it at tiny configs)")
    ap.add_argument("--target", default="llama-3.1-8b", help="the target's folder under --configs "
                    "(method mtp: one whose config has num_nextn_predict_layers, e.g. glm-4.5-air-4l)")
    args = ap.parse_args()
    run(args.methods, args.k, args.prompt_len, args.output_len, args.device, args.configs,
        args.output_json, args.target)


if __name__ == "__main__":
    main()
