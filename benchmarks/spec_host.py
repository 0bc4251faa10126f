"""The host work of a speculative step, on the CPU: a proxy for the host-bound GPU regime.

SmolLM2-135M on an H200 is host-bound (0.94 ms per plain step, nearly all of it host work), so
n-gram speculation gains only if a speculative step costs about a plain step of host time. This
benchmark makes the same regime on the CPU: a random Llama whose forward is cheap (2 layers,
hidden 64, vocab 256: a few hundred microseconds of torch op overhead), through the real engine
(``LLM`` -> ``LLMEngine.step`` -> scheduler, runner, proposer, output processor), and splits each
step's host time into phases by wrapping the functions that do them (inclusive times; nested
phases are marked ``.``)::

    step               LLMEngine.step, everything
    .schedule          Scheduler.schedule (block allocation, drafts onto the step)
    .update            Scheduler.update (accepted tokens, stop checks, KV rollback)
    ..rollback         spec_ahead.give_back: rejected drafts' slots back to the block manager
    .apply             InputBatch.apply (the runner's per-request state from the step)
    .build_inputs      input_builder.build_inputs (ids, positions, slots, query starts, ...)
    .forward           ModelRunner._forward (host -> device copies + the model + logits)
    ..model            the model's forward alone
    .sampling_batch    build_sampling_batch (per-row sampling parameters)
    .sample            ModelRunner._sample (the sampler: argmax for greedy)
    .collect           runner_output.collect (readback -> accepted tokens per request)
    .propose           SpecDecodeRunner.propose (the n-gram search and its bookkeeping)
    .outputs           OutputProcessor.process (detokenise-free here: token ids only)

Workload: copy-heavy prompts (a random passage of 48 tokens repeated, so a random model's greedy
continuation falls into the same kind of loops a copy task gives n-gram), greedy, EOS ignored.
Batch 1 (requests one after another) and batch 8 (8 at once). One plain engine and one n-gram
engine per k are loaded side by side and run in interleaved rounds; the figure per engine is the
median over rounds of ms per output token (wall time of the whole generate / output tokens).

Usage: python benchmarks/spec_host.py --out DIR [--rounds 3] [--tokens 256] [--ks 3 5 8] [--async]
       python benchmarks/spec_host.py --table DIR/spec_host.json     (a markdown table of it)
       python benchmarks/spec_host.py --search     (the n-gram search alone, us per call, best of 15)
Writes DIR/spec_host.json after every round. ``host_ms_per_step``: the step without the model's
forward (what a GPU step would spend on the host); ``step_vs_plain`` / ``host_vs_plain``: a
speculative step's time over a plain one's. The speed-up is about ``tokens_per_step /
step_vs_plain``: with the host work of a step near a plain one's, the accepted tokens are
nearly free.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spec_cpu import _loadavg  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)
from tessellm import LLM  # noqa: E402
from tessellm.core.sampling_params import SamplingParams  # noqa: E402
from tessellm.sampling_params import RequestOutputKind  # noqa: E402

PHASES = {  # name -> (module path, attribute path): functions wrapped with a timer
    "step": ("tessellm.core.llm_engine", "LLMEngine.step"),
    ".schedule": ("tessellm.core.scheduler", "Scheduler.schedule"),
    ".update": ("tessellm.core.scheduler", "Scheduler.update"),
    "..rollback": ("tessellm.core.scheduler_update", "give_back"),
    ".apply": ("tessellm.core.input_batch", "InputBatch.apply"),
    ".build_inputs": ("tessellm.core.model_runner", "build_inputs"),
    ".forward": ("tessellm.core.model_runner", "ModelRunner._forward"),
    ".sampling_batch": ("tessellm.core.model_runner", "build_sampling_batch"),
    ".sample": ("tessellm.core.model_runner", "ModelRunner._sample"),
    ".collect": ("tessellm.core.model_runner", "collect"),
    ".propose": ("tessellm.spec_decode.runner_part", "SpecDecodeRunner.propose"),
    ".outputs": ("tessellm.core.output_processor", "OutputProcessor.process"),
}


class Timers:
    """Per-phase accumulated seconds, for the engine currently measured (``active``)."""

    def __init__(self):
        self.active: dict[str, float] | None = None

    def install(self) -> None:
        import importlib

        for name, (module_name, attr) in PHASES.items():
            owner = importlib.import_module(module_name)
            *path, leaf = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            setattr(owner, leaf, self._wrap(name, getattr(owner, leaf)))

    def _wrap(self, name: str, fn):
        timers = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if timers.active is not None:
                    timers.active[name] = timers.active.get(name, 0.0) + time.perf_counter() - t0
        return timed

    def wrap_model(self, llm) -> None:
        model = llm.engine.core.runner.model
        model.forward = self._wrap("..model", model.forward)


def save_model(root: str) -> str:
    """The random Llama (HF config + safetensors), built here, never downloaded."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tessellm.testing.harness import TINY_LLAMA

    path = os.path.join(root, "host-llama")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(1234)
        config = LlamaConfig(**{**TINY_LLAMA, "max_position_embeddings": 2048})
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def copy_prompts(n: int, vocab: int = 256, length: int = 48, repeats: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, size=length).tolist() * repeats for _ in range(n)]


def run(llm, prompts: list[list[int]], tokens: int, batch: int, timers: Timers) -> tuple[dict, list]:
    """Generate every prompt ``batch`` at a time; wall time, output tokens, steps, phases."""
    from tessellm.spec_decode.metrics import SpecDecodeStats

    engine = llm.engine
    engine.core.scheduler.spec_stats = SpecDecodeStats()
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    phases: dict[str, float] = {}
    outs: dict[str, list[int]] = {}
    steps = 0
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch):
        for i in range(start, min(start + batch, len(prompts))):
            engine.add_request(f"r{i}-{time.monotonic_ns()}", {"prompt_token_ids": prompts[i]}, params)
        timers.active = phases
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outs[out.request_id] = list(out.outputs[0].token_ids)
            steps += 1
        timers.active = None
    wall = time.perf_counter() - t0
    produced = sum(len(t) for t in outs.values())
    ordered = [outs[k] for k in sorted(outs, key=lambda r: int(r[1:].split("-")[0]))]
    spec = engine.core.scheduler.spec_stats
    return {"wall_s": wall, "tokens": produced, "steps": steps, "phases": phases,
            "acceptance": spec.as_dict() if spec.num_drafts else None}, ordered


def summarise(runs: list[dict]) -> dict:
    """Median ms per output token; per-step phase times (ms) of the median run."""
    ms = [1e3 * r["wall_s"] / r["tokens"] for r in runs]
    mid = sorted(range(len(runs)), key=lambda i: ms[i])[len(runs) // 2]
    r = runs[mid]
    per_step = {k: 1e3 * v / r["steps"] for k, v in r["phases"].items()}
    return {"ms_per_token": round(statistics.median(ms), 4), "tokens_per_step": round(r["tokens"] / r["steps"], 3),
            "steps": r["steps"], "step_ms": round(per_step["step"], 4),
            "host_ms_per_step": round(per_step["step"] - per_step.get("..model", 0.0), 4),
            "phase_ms_per_step": {k: round(v, 4) for k, v in per_step.items()},
            "phase_ms_per_token": {k: round(1e3 * v / r["tokens"], 4) for k, v in r["phases"].items()},
            "acceptance": r["acceptance"]}


COLUMNS = ("ms_per_token", "speedup", "tokens_per_step", "step_ms", "step_vs_plain", "host_ms_per_step",
           "host_vs_plain")
PHASE_COLUMNS = (".schedule", ".build_inputs", ".forward", "..model", ".sample", ".collect", ".propose", ".update",
                 "..rollback", ".outputs")


def table(path: str) -> str:
    """A markdown table of a spec_host.json: per batch and engine the figures, then the phases
    (ms per step). ``host`` is the step without the model's forward."""
    with open(path) as f:
        result = json.load(f)
    lines = [f"{result['model']}; {result['workload']}; load {result['load_avg_start']} -> "
             f"{result.get('load_avg_end', '?')}", ""]
    head = ["batch", "engine", *COLUMNS, "acceptance length", *PHASE_COLUMNS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(k for k in result if k.startswith("batch")):
        for name, row in result[key].items():
            acc = (row.get("acceptance") or {}).get("mean_acceptance_length", "")
            cells = [key[5:], name, *(row[c] for c in COLUMNS), acc,
                     *(row["phase_ms_per_step"].get(c, 0.0) for c in PHASE_COLUMNS)]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def search_times(nmin: int = 2, nmax: int = 5, k: int = 5) -> dict:
    """The n-gram search alone (``propose_ngram``), best of 15 x 100 calls, in microseconds, on
    histories of 150-400 tokens: "copy" (a passage copied with insertions) and "loops" (short
    cycles, as a random model's greedy output: many candidate columns)."""
    import timeit

    from tessellm.spec_decode.ngram import propose_ngram

    rng = np.random.default_rng(0)
    out = {}
    for kind in ("copy", "loops"):
        for batch in (1, 8, 32):
            tokens = np.full((batch, 1030), -1, dtype=np.int32)
            lens = np.zeros(batch, dtype=np.int64)
            for i in range(batch):
                base = rng.integers(3, 256, 48).tolist() * 3
                if kind == "loops":
                    more = rng.integers(3, 256, 40).tolist() + [62, 104, 126] * 30 + [7] * 40
                else:
                    more = (rng.integers(3, 256, 20).tolist() + base[:60]) * 3
                h = (base + more)[:int(rng.integers(150, 400))]
                tokens[i, :len(h)], lens[i] = h, len(h)
            rows = np.arange(batch)
            best = min(timeit.repeat(lambda: propose_ngram(tokens, lens, rows, nmin, nmax, k), number=100, repeat=15))
            out[f"{kind}_b{batch}"] = round(best / 100 * 1e6, 1)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/tessellm-out"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--ks", type=int, nargs="+", default=[3, 5, 8])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--async", dest="async_", action="store_true", help="also n-gram k=5 with async_scheduling")
    p.add_argument("--table", help="print the markdown table of this spec_host.json and exit")
    p.add_argument("--search", action="store_true", help="time the n-gram search alone (us per call) and exit")
    args = p.parse_args()
    if args.table:
        print(table(args.table))
        return 0
    if args.search:
        print(json.dumps(search_times()))
        return 0
    os.makedirs(args.out, exist_ok=True)
    import torch

    torch.set_num_threads(1)  # a tiny model: threads only add overhead (and the 2 cores are shared)
    timers = Timers()
    timers.install()
    model = save_model(os.path.join(tempfile.gettempdir(), "tessellm-spec-host"))
    common = dict(model=model, device="cpu", dtype="float32", max_model_len=1024, enable_prefix_caching=False,
                  max_num_seqs=max(args.batches))
    configs = {"plain": {}}
    for k in args.ks:
        configs[f"ngram_k{k}"] = {"speculative_config": {"method": "ngram", "num_speculative_tokens": k}}
    if args.async_:
        configs["ngram_k5_async"] = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 5},
                                     "async_scheduling": True}
    engines = {name: LLM(**common, **extra) for name, extra in configs.items()}
    for llm in engines.values():
        timers.wrap_model(llm)
    prompts = copy_prompts(args.prompts)
    result = {"model": "random Llama, 2 layers, hidden 64, vocab 256, fp32, cpu backend, 1 torch thread",
              "workload": f"{len(prompts)} prompts (48 random tokens x3), greedy, {args.tokens} output tokens, EOS ignored",
              "load_avg_start": _loadavg(), "rounds": []}
    runs: dict[tuple[str, int], list[dict]] = defaultdict(list)
    plain_out: dict[int, list] = {}
    for rnd in range(args.rounds):
        for batch in args.batches:
            for name, llm in engines.items():
                stats, outs = run(llm, prompts, args.tokens, batch, timers)
                runs[(name, batch)].append(stats)
                if name == "plain":
                    plain_out.setdefault(batch, outs)
                elif outs != plain_out[batch]:
                    raise SystemExit(f"{name} batch {batch}: greedy tokens differ from plain")
        result["rounds"].append({"round": rnd, "load_avg": _loadavg()})
        for batch in args.batches:
            summary = {name: summarise(runs[(name, batch)]) for name in engines}
            base = summary["plain"]["ms_per_token"]
            for name, row in summary.items():
                row["speedup"] = round(base / row["ms_per_token"], 3)
                row["step_vs_plain"] = round(row["step_ms"] / summary["plain"]["step_ms"], 3)
                row["host_vs_plain"] = round(row["host_ms_per_step"] / summary["plain"]["host_ms_per_step"], 3)
            result[f"batch{batch}"] = summary
        with open(os.path.join(args.out, "spec_host.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps({b: {n: (r["ms_per_token"], r["speedup"], r["tokens_per_step"])
                              for n, r in result[f"batch{b}"].items()} for b in args.batches}), flush=True)
    result["load_avg_end"] = _loadavg()
    with open(os.path.join(args.out, "spec_host.json"), "w") as f:
        json.dump(result, f, indent=2)
    for llm in engines.values():
        llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
