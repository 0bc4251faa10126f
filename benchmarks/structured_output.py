"""Structured output on a GPU: F with a JSON schema on every request vs F unconstrained in the
same run, the per-step cost of filling and applying the token mask, and the compile time of a
large schema. Run through ``bash benchmarks/structured_output.sh`` (results in $OUT).

The model is Llama-3.1-8B shaped with random weights (F's definition), which has no tokenizer
here: the grammars are compiled against a synthetic 128,256-entry vocabulary (single bytes,
JSON punctuation, digit runs and seeded random words), which is what the mask cost depends on.
The F-JSON schema (``F_SCHEMA``) is an object of 64 required bounded integers: no token of the
vocabulary spans a key and its separators, so any valid output is over 380 tokens and every
request really produces its 256 tokens under the constraint (the grammar cannot end earlier).
``LONG_SCHEMA`` (an array of at least 300 integers, the F-JSON schema until 2026-12-04 wave 2c)
runs too: xgrammar's per-token cost of a counted repetition grows with the count reached
(minItems 300: ~13 us a token at the first items, over 100 us by the 120th, on one core),
which makes that run measure xgrammar's repetition counting more than the engine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import time

import numpy as np
import torch

LONG_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 300}
_F_PROPS = {f"k{i}": {"type": "integer", "minimum": 0, "maximum": 999} for i in range(64)}
F_SCHEMA = {"type": "object", "properties": _F_PROPS, "required": list(_F_PROPS), "additionalProperties": False}


def synthetic_vocab(size: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [chr(i) for i in range(32, 127)] + list("\n\t") + ['", "', '": ', ", ", "{\"", "\"}", "[", "]"]
    vocab += [str(i) for i in range(1000)]
    seen = set(vocab)
    while len(vocab) < size - 1:
        word = "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(2, 8)))
        word = rng.choice(["", " "]) + word
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    return vocab + ["</s>"]


def large_schema(num_props: int = 200) -> dict:
    kinds = [{"type": "integer", "minimum": 0, "maximum": 10_000}, {"type": "string", "maxLength": 64},
             {"enum": ["a", "b", "c", "d"]}, {"type": "array", "items": {"type": "number"}, "maxItems": 8},
             {"type": "object", "properties": {"x": {"type": "boolean"}, "y": {"type": "string"}},
              "required": ["x"]}]
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(num_props)}
    return {"type": "object", "properties": props, "required": list(props)[: num_props // 2]}


def tokenizer_info(vocab_size: int):
    import xgrammar as xgr

    vocab = synthetic_vocab(vocab_size)
    return xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=vocab_size,
                             stop_token_ids=[vocab_size - 1])


PERSON_SCHEMA = {  # a typical API schema: strings, enums, bounded numbers, a nested object, an array
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40}, "email": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                    "required": ["city"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
    "required": ["name", "age", "role", "address"]}
# Prefixes that leave a matcher inside a string (the costliest state: most tokens allowed), after
# a number, after a key, in an array.
PERSON_PREFIXES = ['{"name": "Ad', '{"name": "Ann", "email": "ann@exa', '{"name": "Bo", "age": 4',
                   '{"name": "C", "age": 3, "role": "admin", "address": {"city": "Par',
                   '{"name": "D", "age": 9, "role": "viewer", "address": {"city": "X"}, "tags": ["a", "b']


def _matchers(compiled, prefix_of, batch: int) -> list:
    import xgrammar as xgr

    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    for i, m in enumerate(matchers):  # spread the matchers over different states
        assert m.accept_string(prefix_of(i)), prefix_of(i)
    return matchers


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def fill_costs(compiled, prefix_of, vocab_size: int, batches=(1, 64, 256)) -> dict:
    """Host ms per step to fill the mask rows of ``batch`` constrained requests: before (a
    fresh array per step, rows one after another) and now (``StructuredOutputManager``: reused
    buffers, rows in parallel threads)."""
    import xgrammar as xgr

    from tessellm.core.step import SchedulerOutput
    from tessellm.structured_output.compiler import RequestGrammar
    from tessellm.structured_output.manager import StructuredOutputManager

    out = {}
    for batch in batches:
        matchers = _matchers(compiled, prefix_of, batch)

        def before():
            bitmask = xgr.allocate_token_bitmask(batch, vocab_size)
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bitmask, i)

        manager = StructuredOutputManager(lambda: None, vocab_size, [vocab_size - 1])
        requests = {}
        for i, m in enumerate(matchers):
            grammar = RequestGrammar(None)
            grammar.matcher = m
            requests[f"r{i}"] = type("R", (), {"grammar": grammar})()
        ids = {rid: 1 for rid in requests}
        sched = SchedulerOutput([], [], ids, batch, num_sampled_tokens=ids)
        out[batch] = {"before_ms": _median_ms(before, 7),
                      "now_ms": _median_ms(lambda: manager.fill_bitmask(sched, requests), 15),
                      "threads": manager.fill_threads}
    return out


def upload_costs(bitmask: torch.Tensor, device: str) -> dict:
    """Host ms per step to get a ``[batch, V/32]`` mask onto the device (each timed to the
    device copy's end): from pageable memory; copied into a pinned buffer with torch (the way
    before, and ``MaskUpload``'s path for a mask filled elsewhere) or numpy; filled straight
    into the runner's pinned buffer (now: no host copy); and the host copies alone."""
    import os

    from tessellm.core.step_pipeline import _pinned
    from tessellm.structured_output.apply import MaskUpload

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    upload = MaskUpload(torch.device(device))
    pinned = _pinned(bitmask.numel(), torch.int32).view(bitmask.shape)

    def torch_copy():
        pinned.copy_(bitmask)
        pinned.to(device, non_blocking=True)

    def lent():
        host = upload.host_buffer(*bitmask.shape) if upload.pinned else bitmask
        upload(host)

    out = {"pageable": _median_ms(lambda: (bitmask.to(device, non_blocking=True), sync()), 20),
           "pinned_torch_copy": _median_ms(lambda: (torch_copy(), sync()), 20),
           "mask_upload_copy": _median_ms(lambda: (upload(bitmask), sync()), 20),
           "lent_pinned_no_copy": _median_ms(lambda: (lent(), sync()), 20),
           "host_copy_torch": _median_ms(lambda: pinned.copy_(bitmask), 20),
           "host_copy_numpy": _median_ms(lambda: np.copyto(pinned.numpy(), bitmask.numpy()), 20)}
    out["torch_threads"] = torch.get_num_threads()
    out["cpu_count"] = os.cpu_count()
    out["affinity"] = len(os.sched_getaffinity(0))
    return out


def micro(info, vocab_size: int, batch: int, device: str) -> dict:
    """Compile time (large schema, cold); mask fill per step at batch 1/64/256 for F's schema
    and a typical API schema; mask upload and application per step at ``batch``."""
    import xgrammar as xgr

    from tessellm.backends.reference.logits import ReferenceLogitsOps
    from tessellm.kernels.bitmask import apply_token_bitmask

    compiler = xgr.GrammarCompiler(info, max_threads=8, cache_enabled=False)
    t0 = time.perf_counter()
    compiler.compile_json_schema(json.dumps(large_schema()))
    compile_large_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    f_grammar = compiler.compile_json_schema(json.dumps(F_SCHEMA), any_whitespace=False)
    compile_f_s = time.perf_counter() - t0
    long_grammar = compiler.compile_json_schema(json.dumps(LONG_SCHEMA), any_whitespace=False)
    person = compiler.compile_json_schema(json.dumps(PERSON_SCHEMA))
    fill = {"f_schema": fill_costs(f_grammar, lambda i: "{" + ", ".join(f'"k{j}": {(i * 7 + j) % 1000}'
                                                                       for j in range(i % 13)), vocab_size),
            "min300_schema": fill_costs(long_grammar, lambda i: "[" + ", ".join(str((i * 7 + j) % 1000)
                                                                               for j in range(i % 13)), vocab_size),
            "person_schema": fill_costs(person, lambda i: PERSON_PREFIXES[i % len(PERSON_PREFIXES)], vocab_size)}
    bitmask = xgr.allocate_token_bitmask(batch, vocab_size)
    for i, m in enumerate(_matchers(person, lambda i: PERSON_PREFIXES[i % 5], batch)):
        m.fill_next_token_bitmask(bitmask, i)
    upload_ms = upload_costs(bitmask, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    logits = torch.randn(batch, vocab_size, dtype=torch.bfloat16, device=device)
    mask = bitmask.to(device)
    apply = {"reference": lambda x: ReferenceLogitsOps().apply_token_bitmask(x, mask)}
    if device == "cuda":
        apply["triton"] = lambda x: apply_token_bitmask(x, mask)
    apply_ms = {}
    for name, fn in apply.items():
        x = logits.clone()
        for _ in range(3):
            fn(x)
        sync()
        apply_ms[name] = _median_ms(lambda: (fn(x), sync()), 30)
    return {"batch": batch, "vocab": vocab_size, "compile_large_schema_s": compile_large_s,
            "large_schema_properties": len(large_schema()["properties"]), "compile_f_schema_s": compile_f_s,
            "mask_fill_ms_per_step": fill, "mask_upload_ms_per_step": upload_ms,
            "mask_apply_ms_per_step": apply_ms}


class StepTimers:
    """Wall time spent in the engine loop's parts (wrapped instance methods), for the per-step
    breakdown: where a constrained step's host time goes next to an unconstrained one."""

    PARTS = {"core": ["step", "_sample_deferred"], "scheduler": ["schedule", "update"],
             "executor": ["submit", "collect", "sample_deferred"],
             "structured": ["fill_bitmask", "_fill_plain"]}

    def __init__(self, core):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        owners = {"core": core, "scheduler": core.scheduler, "executor": core.executor}
        for owner, names in self.PARTS.items():
            obj = owners.get(owner)
            for name in names:
                if obj is not None and hasattr(obj, name):
                    setattr(obj, name, self._timed(f"{owner}.{name}", getattr(obj, name)))
        self._core = core

    def wrap_structured(self) -> None:
        for name in self.PARTS["structured"]:
            obj = self._core.structured
            setattr(obj, name, self._timed(f"structured.{name}", getattr(obj, name)))

    def _timed(self, key, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - t0
                self.counts[key] = self.counts.get(key, 0) + 1
        return timed

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()

    def per_step_ms(self) -> dict:
        steps = max(1, self.counts.get("core.step", 1))
        out = {key: round(total * 1e3 / steps, 3) for key, total in sorted(self.totals.items())}
        out["steps"] = steps
        return out


def load_f_engine(args, info):
    """One engine for every F variant (the same weights, graphs and KV cache)."""
    from tessellm import LLM
    from tessellm.structured_output.manager import StructuredOutputManager

    llm = LLM(model=args.model, load_format="dummy", max_model_len=4096, max_num_seqs=256,
              async_scheduling=args.async_scheduling)
    core = llm.engine.core
    lent = core.structured.host_buffer
    # No tokenizer with dummy weights: grammars compile against the synthetic vocabulary.
    core.structured = StructuredOutputManager(lambda: info, core.vocab_size, [core.vocab_size - 1])
    core.structured.host_buffer = lent
    llm.so_lent_buffer = lent  # the runner's pinned buffers (None on a CPU)
    return llm


def _prompts(vocab_size: int, num: int, length: int, seed: int) -> list[dict]:
    """Random prompts; each run its own seed, so no run reads another's prefix cache."""
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(vocab_size - 1) for _ in range(length)]} for _ in range(num)]


def workload_f(llm, args, info, schema, timers: StepTimers, variant: str, seed: int) -> dict:
    """F's throughput on ``llm``; ``schema``: every request under it (None: F itself).
    Variants of F-JSON: "now" (the mask filled in the runner's pinned buffer, in the
    background while the loop schedules) and "inline" (filled in the core's own buffer on the
    loop, then copied to pinned memory: the path before). Every constrained output is checked
    against the grammar (a fresh matcher accepts all its tokens)."""
    import xgrammar as xgr

    from tessellm import SamplingParams
    from tessellm.structured_output import StructuredOutputsParams

    core = llm.engine.core
    core.structured.host_buffer = llm.so_lent_buffer if variant == "now" else None
    core.structured.background_fill = variant == "now"
    prompts = _prompts(core.vocab_size, args.num_prompts, args.input_len, seed)
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True) if schema else None
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, structured_outputs=so)
    llm.generate(_prompts(core.vocab_size, 8, args.input_len, seed + 1000),
                 SamplingParams(max_tokens=4, ignore_eos=True, structured_outputs=so), use_tqdm=False)
    deferred0, background0 = core.structured.num_deferred_steps, core.structured.num_background_fills
    timers.reset()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    valid = None
    if schema:
        grammar = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(json.dumps(schema),
                                                                              any_whitespace=False)
        valid = sum(all(m.accept_token(t) for t in o.outputs[0].token_ids)
                    for o in outs for m in [xgr.GrammarMatcher(grammar)])
    per_step = timers.per_step_ms()
    per_step["outside_core_step"] = round((elapsed * 1e3 - per_step.get("core.step", 0) * per_step["steps"])
                                          / per_step["steps"], 3)
    return {"schema": None if schema is None else ("min300" if schema is LONG_SCHEMA else "f_schema"),
            "variant": variant if schema else None, "async_scheduling": core.async_scheduling,
            "defer_grammar": core.scheduler.config.defer_grammar,
            "deferred_steps": core.structured.num_deferred_steps - deferred0,
            "background_fills": core.structured.num_background_fills - background0, "elapsed_s": elapsed,
            "output_tokens": tokens, "output_tok_per_s": tokens / elapsed, "requests": len(outs),
            "outputs_in_grammar": valid, "host_ms_per_step": per_step}


RUNS = [("f", None, "now"), ("f_json", F_SCHEMA, "now"), ("f_json_min300", LONG_SCHEMA, "now"),
        ("f_again", None, "now"), ("f_json_inline", F_SCHEMA, "inline")]


def run_f(args, info) -> dict:
    """After a warm-up at F's shapes (the batch-256 kernels compile there, not in a timed run):
    F, F-JSON, F-JSON with the array schema, F again, F-JSON the way before (mask inline,
    copied); one engine, each run with its own prompts."""
    from tessellm import SamplingParams

    llm = load_f_engine(args, info)
    timers = StepTimers(llm.engine.core)
    timers.wrap_structured()
    t0 = time.perf_counter()
    llm.generate(_prompts(llm.engine.core.vocab_size, args.num_prompts, args.input_len, 99),
                 SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    result = {"warmup_s": time.perf_counter() - t0}
    for seed, (name, schema, variant) in enumerate(RUNS[:args.f_runs]):
        result[name] = workload_f(llm, args, info, schema, timers, variant, seed)
        print(json.dumps({name: result[name]}), flush=True)
    llm.shutdown()
    plain = [result[k]["output_tok_per_s"] for k in ("f", "f_again") if k in result]
    f = sum(plain) / len(plain)
    for name in ("f_json", "f_json_min300", "f_json_inline"):
        if name in result:
            result[name + "_over_f"] = result[name]["output_tok_per_s"] / f
    print(f"F-JSON / F = {result.get('f_json_over_f', 0):.3f} (goal >= 0.90; F the mean of {len(plain)} runs); "
          f"array schema: {result.get('f_json_min300_over_f', 0):.3f}; the way before: "
          f"{result.get('f_json_inline_over_f', 0):.3f}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/model-configs/llama-3.1-8b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=128256)
    p.add_argument("--skip-f", action="store_true", help="only the compile / mask micro-benchmarks")
    p.add_argument("--f-runs", type=int, default=len(RUNS),
                   help="how many of F, F-JSON, F-JSON array schema, F again, F-JSON inline (before) to run")
    p.add_argument("--async-scheduling", action="store_true", default=None,
                   help="force async scheduling (the default is on for GPUs; for a CPU smoke run)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = tokenizer_info(args.vocab_size)
    result = {"micro": micro(info, args.vocab_size, args.num_prompts, device)}
    print(json.dumps(result["micro"], indent=1), flush=True)
    if not args.skip_f:
        result.update(run_f(args, info))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
