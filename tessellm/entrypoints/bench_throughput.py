"""``tessellm bench throughput``: offline throughput on random-token prompts, EOS ignored, greedy
(``--sampling-params`` for other sampling, e.g. '{"temperature": 0.7, "top_p": 0.9}').

``--backend hf`` runs HF transformers' static batched ``generate`` on the same prompts
(left-padded; each batch runs until its longest request; only each request's own tokens count),
for a side-by-side figure. Model loading is excluded from every figure.
"""

from __future__ import annotations

import dataclasses
import os
import json
import random
import time
from dataclasses import dataclass

from tessellm.entrypoints.engine_args import add_engine_arguments, engine_args_from
from tessellm.json_arg import json_object_arg

SAMPLING_EXAMPLE = '{"temperature": 0.7, "top_p": 0.9}'


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="Model dir or .gguf (default: bundled SmolLM2).")
    p.add_argument("--backend", default="tessellm", choices=["tessellm", "hf"])
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="Draw each length uniformly from [L(1-R), L(1+R)].")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--hf-disable-cudnn-sdpa", action="store_true")
    p.add_argument("--warmup", default="auto", choices=["auto", "tiny", "full"],
                   help="untimed run first: full = the whole workload (auto: full except on cpu)")
    p.add_argument("--output-json", default=None)
    add_sampling_argument(p)
    p.add_argument("--lora-dir", default=None,
                   help="a directory of PEFT adapters (one per subdirectory): requests are spread "
                        "over them uniformly (needs --enable-lora)")
    add_engine_arguments(p)


def add_sampling_argument(p) -> None:
    p.add_argument("--sampling-params", default=None,
                   help=f"SamplingParams fields as JSON, over greedy (e.g. '{SAMPLING_EXAMPLE}'); "
                        "the workload sets max_tokens and ignore_eos")


def sampling_params(args, max_tokens: int):
    """The benchmark's SamplingParams: greedy, EOS ignored, ``--sampling-params`` over them."""
    from tessellm import SamplingParams

    extra = json_object_arg(getattr(args, "sampling_params", None), "--sampling-params", SAMPLING_EXAMPLE)
    fixed = sorted({"max_tokens", "ignore_eos"} & set(extra))
    if fixed:
        raise ValueError(f"--sampling-params sets {', '.join(fixed)}: the workload's lengths set "
                         "them (--output-len); leave them out.")
    if isinstance(extra.get("logit_bias"), dict):  # JSON keys are strings: token ids, as the server takes them
        extra["logit_bias"] = {int(k) if str(k).lstrip("-").isdigit() else k: v for k, v in extra["logit_bias"].items()}
    try:
        return SamplingParams(**{"temperature": 0, **extra, "max_tokens": max_tokens, "ignore_eos": True})
    except TypeError as exc:
        raise ValueError(f"--sampling-params: {exc}; give SamplingParams fields, e.g. '{SAMPLING_EXAMPLE}'.") from None


def make_requests(num: int, input_len: int, output_len: int, ratio: float, vocab: int,
                  seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)

    def length(n: int) -> int:
        lo, hi = max(1, int(n * (1 - ratio))), max(1, int(n * (1 + ratio)))
        return rng.randint(lo, hi)

    reqs = []
    for _ in range(num):
        n_in, n_out = length(input_len), length(output_len)
        reqs.append(BenchRequest([rng.randrange(vocab) for _ in range(n_in)], n_out))
    return reqs


def run(args) -> int:
    if args.sampling_params is not None:  # checked before any model loads
        if args.backend == "hf":
            raise SystemExit("--sampling-params applies to --backend tessellm (the HF baseline is greedy).")
        sampling_params(args, 1)
    result = run_hf(args) if args.backend == "hf" else run_tessellm(args)
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _summary(args, reqs: list[BenchRequest], elapsed: float, extra: dict) -> dict:
    out_tokens = sum(r.output_len for r in reqs)
    in_tokens = sum(len(r.prompt_token_ids) for r in reqs)
    return {"backend": args.backend, "model": args.model, "num_prompts": len(reqs),
            "input_tokens": in_tokens, "output_tokens": out_tokens, "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(len(reqs) / elapsed, 3),
            "output_tokens_per_s": round(out_tokens / elapsed, 2),
            "total_tokens_per_s": round((in_tokens + out_tokens) / elapsed, 2), **extra}


def lora_requests(lora_dir, num: int) -> list:
    """One LoRARequest per request, round robin over the adapters in ``lora_dir`` (None: none)."""
    if lora_dir is None:
        return [None] * num
    from tessellm.lora import LoRARequest

    names = sorted(d for d in os.listdir(lora_dir) if os.path.isdir(os.path.join(lora_dir, d)))
    if not names:
        raise ValueError(f"--lora-dir {lora_dir} has no adapter subdirectories.")
    loras = [LoRARequest(n, i + 1, os.path.join(lora_dir, n)) for i, n in enumerate(names)]
    return [loras[i % len(loras)] for i in range(num)]


def run_tessellm(args) -> dict:
    from tessellm import LLM

    llm = LLM(**dataclasses.asdict(engine_args_from(args, args.model)))
    info = llm.engine.info
    # -dp N: the engine cores are in their own processes (tessellm.core.dp_engine), and what
    # is read below from the in-process core comes from their EngineInfo and stats instead.
    dp = getattr(args, "data_parallel_size", 1) > 1
    core = None if dp else llm.engine.core
    reqs = make_requests(args.num_prompts, args.input_len, args.output_len, args.random_range_ratio,
                         info.vocab_size, args.seed)
    params = [sampling_params(args, r.output_len) for r in reqs]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    loras = lora_requests(args.lora_dir, len(reqs))
    # Warm-up: JIT compilation and allocator growth stay out of the timed region. Triton
    # compiles a kernel variant per shape class the first time a step meets it (measured on an
    # H200: ~1.7 s of a cold 6.9 s F run), so on accelerators the whole workload runs once first.
    on_cpu = info.backend == "cpu" if dp else core.backend.device_type == "cpu"
    warmup = args.warmup if args.warmup != "auto" else ("tiny" if on_cpu else "full")
    if warmup == "full":  # same lengths, other tokens: no prefix-cache hits carry over
        warm = make_requests(args.num_prompts, args.input_len, args.output_len,
                             args.random_range_ratio, info.vocab_size, args.seed + 1)
        llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in warm],
                     [sampling_params(args, r.output_len) for r in warm], use_tqdm=False,
                     lora_request=loras)
    else:  # tiny: the timed run's sampling, on two short prompts
        warm = make_requests(2, 16, 4, 0.0, info.vocab_size, args.seed + 1)
        llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in warm],
                     sampling_params(args, 4), use_tqdm=False)
    sync = core.backend.synchronize if core is not None and core.parallel.world_size == 1 else (lambda: None)
    sync()  # (with workers, each step's results come back only once the step is done)
    split_before = _overlap_splits(core)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    sync()
    elapsed = time.perf_counter() - start
    split_after = _overlap_splits(core)
    produced = [len(o.outputs[0].token_ids) for o in outs]
    assert produced == [r.output_len for r in reqs], "a request stopped early despite ignore_eos"
    return _summary(args, reqs, elapsed, {"device": info.backend, "dtype": info.dtype,
                                          "warmup": warmup, "sampling_params": args.sampling_params,
                                          "async_scheduling": None if dp else core.async_scheduling,
                                          "data_parallel_size": getattr(args, "data_parallel_size", 1),
                                          "tensor_parallel_size": args.tensor_parallel_size,
                                          "pipeline_parallel_size": args.pipeline_parallel_size,
                                          "num_kv_blocks": info.num_kv_blocks,
                                          "num_loras": len({lr.lora_int_id for lr in loras if lr}),
                                          "preemptions": (sum(s.get("num_preemptions_total", 0)
                                                              for s in llm.engine.core_stats()) if dp
                                                          else core.scheduler.num_preemptions_total),
                                          "spec_decode": None if dp else _spec_decode(core),
                                          "decode_overlap_splits": split_after and {
                                              k: v - split_before[k] for k, v in split_after.items()}})


def _overlap_splits(core):
    """Steps the decode overlap split so far by kind (core/decode_overlap.py), None when it is
    off or the runner is in another process."""
    overlap = getattr(getattr(core, "runner", None), "overlap", None)
    return dict(overlap.splits) if overlap is not None else None


def _spec_decode(core):
    """Speculative decoding counters (tessellm.spec_decode.metrics), None when it is off."""
    stats = core.scheduler.spec_stats
    return stats.as_dict() if stats.num_drafts else None


def run_hf(args) -> dict:
    import torch

    from tessellm.backends.registry import get_registry
    from tessellm.config import resolve_dtype, resolve_model

    backend = get_registry().select(args.device, getattr(args, "emulate", False))
    device = backend.torch_device()
    source = resolve_model(args.model)
    dtype = resolve_dtype(args.dtype, source.hf_config, backend.device_type)
    if args.hf_disable_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = _load_hf(source, args.load_format, dtype, device)
    vocab = source.hf_config.vocab_size
    reqs = make_requests(args.num_prompts, args.input_len, args.output_len, args.random_range_ratio,
                         vocab, args.seed)
    pad = 0
    _hf_generate(model, reqs[:2], pad, device)  # warm-up
    backend.synchronize()
    start = time.perf_counter()
    for i in range(0, len(reqs), args.hf_batch_size):
        _hf_generate(model, reqs[i:i + args.hf_batch_size], pad, device)
    backend.synchronize()
    elapsed = time.perf_counter() - start
    return _summary(args, reqs, elapsed, {"device": backend.name, "dtype": str(dtype),
                                          "hf_batch_size": args.hf_batch_size,
                                          "cudnn_sdpa": not args.hf_disable_cudnn_sdpa})


def _load_hf(source, load_format: str, dtype, device):
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from tessellm.loader.transformers_classes import dtype_kwargs

    if load_format == "dummy":
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(source.hf_config, **dtype_kwargs(dtype))
    elif source.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(source.path),
                                                     gguf_file=os.path.basename(source.path),
                                                     **dtype_kwargs(dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, **dtype_kwargs(dtype))
    return model.to(device).eval()


def _hf_generate(model, batch: list[BenchRequest], pad: int, device) -> None:
    import torch

    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        n = len(r.prompt_token_ids)
        ids[row, width - n:] = torch.tensor(r.prompt_token_ids)
        mask[row, width - n:] = 1
    longest = max(r.output_len for r in batch)
    with torch.no_grad():
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                       max_new_tokens=longest, min_new_tokens=longest, pad_token_id=pad)

