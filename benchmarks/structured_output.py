"""Structured output on a GPU: F with a JSON schema on every request vs F unconstrained in the
same run, the per-step cost of filling and applying the token mask, and the compile time of a
large schema. Run through ``bash benchmarks/structured_output.sh`` (results in $OUT).

The model is Llama-3.1-8B shaped with random weights (F's definition), which has no tokenizer
here: the grammars are compiled against a synthetic 128,256-entry vocabulary (single bytes,
JSON punctuation, digit runs and seeded random words), which is what the mask cost depends on.
The F-JSON schema forces an array of at least 300 small integers, so every request really
produces its 256 tokens under the constraint (the grammar cannot end earlier).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import time

import torch

LONG_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 300}


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


def micro(info, vocab_size: int, batch: int, device: str) -> dict:
    """Compile time (large schema, cold), mask fill per step (batch rows), mask application."""
    import xgrammar as xgr

    from tessellm.backends.reference.logits import ReferenceLogitsOps
    from tessellm.kernels.bitmask import apply_token_bitmask

    compiler = xgr.GrammarCompiler(info, max_threads=8, cache_enabled=False)
    t0 = time.perf_counter()
    compiler.compile_json_schema(json.dumps(large_schema()))
    compile_large_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    long_grammar = compiler.compile_json_schema(json.dumps(LONG_SCHEMA), any_whitespace=False)
    compile_long_s = time.perf_counter() - t0
    matchers = [xgr.GrammarMatcher(long_grammar) for _ in range(batch)]
    for i, m in enumerate(matchers):  # spread the matchers over different states
        assert m.accept_string("[" + ", ".join(str((i * 7 + j) % 1000) for j in range(i % 13)))
    bitmask = xgr.allocate_token_bitmask(batch, vocab_size)
    filler = xgr.BatchGrammarMatcher(max_threads=8)
    fills = []
    for _ in range(20):
        t0 = time.perf_counter()
        filler.batch_fill_next_token_bitmask(matchers, bitmask)
        fills.append(time.perf_counter() - t0)
    serial = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        serial.append(time.perf_counter() - t0)
    logits = torch.randn(batch, vocab_size, dtype=torch.bfloat16, device=device)
    mask = bitmask.to(device)
    apply = {"triton": lambda x: apply_token_bitmask(x, mask),
             "reference": lambda x: ReferenceLogitsOps().apply_token_bitmask(x, mask)}
    apply_ms = {}
    for name, fn in apply.items():
        x = logits.clone()
        for _ in range(3):
            fn(x)
        torch.cuda.synchronize() if device == "cuda" else None
        t0 = time.perf_counter()
        for _ in range(50):
            fn(x)
        torch.cuda.synchronize() if device == "cuda" else None
        apply_ms[name] = (time.perf_counter() - t0) / 50 * 1e3
    return {"batch": batch, "vocab": vocab_size, "compile_large_schema_s": compile_large_s,
            "large_schema_properties": len(large_schema()["properties"]), "compile_f_schema_s": compile_long_s,
            "mask_fill_ms_per_step_batched": statistics.median(fills) * 1e3,
            "mask_fill_ms_per_step_serial": statistics.median(serial) * 1e3,
            "mask_apply_ms_per_step": apply_ms}


def workload_f(args, info, structured: bool) -> dict:
    from tessellm import LLM, SamplingParams
    from tessellm.structured_output import StructuredOutputsParams
    from tessellm.structured_output.manager import StructuredOutputManager

    llm = LLM(model=args.model, load_format="dummy", max_model_len=4096, max_num_seqs=256)
    core = llm.engine.core
    # No tokenizer with dummy weights: grammars compile against the synthetic vocabulary.
    core.structured = StructuredOutputManager(lambda: info, core.vocab_size, [core.vocab_size - 1])
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(core.vocab_size - 1) for _ in range(args.input_len)]}
               for _ in range(args.num_prompts)]
    so = StructuredOutputsParams(json=LONG_SCHEMA, disable_any_whitespace=True) if structured else None
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, structured_outputs=so)
    llm.generate(prompts[:8], SamplingParams(max_tokens=4, ignore_eos=True, structured_outputs=so), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    valid_prefix = sum(o.outputs[0].text == "" or o.outputs[0].token_ids[0] >= 0 for o in outs)
    llm.shutdown()
    return {"structured": structured, "elapsed_s": elapsed, "output_tokens": tokens,
            "output_tok_per_s": tokens / elapsed, "requests": len(outs), "checked": valid_prefix}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/model-configs/llama-3.1-8b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=128256)
    p.add_argument("--skip-f", action="store_true", help="only the compile / mask micro-benchmarks")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = tokenizer_info(args.vocab_size)
    result = {"micro": micro(info, args.vocab_size, args.num_prompts, device)}
    print(json.dumps(result["micro"], indent=1), flush=True)
    if not args.skip_f:
        plain = workload_f(args, info, structured=False)
        print(json.dumps(plain), flush=True)
        constrained = workload_f(args, info, structured=True)
        print(json.dumps(constrained), flush=True)
        result.update(f=plain, f_json=constrained,
                      f_json_over_f=constrained["output_tok_per_s"] / plain["output_tok_per_s"])
        print(f"F-JSON / F = {result['f_json_over_f']:.3f} (goal >= 0.90)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
