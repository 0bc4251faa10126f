"""Warm-up before ready: every kernel variant serving can hit runs once before the first request.

Triton compiles a kernel the first time a launch meets a new specialisation (a constexpr such as
the decode's ``NUM_SPLITS``, an int argument that is 1 or a multiple of 16, a GEMM tile chosen by
the token count); graph capture covers only the pure-decode batch sizes it captures. Measured on
an H200 (issue 17): a fresh server's first 500 requests saw p99 TTFT 1.8 s against 76 ms warm.

So after the KV cache is sized (and graphs captured), the engine core drives itself through
synthetic requests, using only its public entry points (``add_request`` / ``step``), shaped to
hit every variant a real batch can:

* prefill: prompt lengths 1, 15, 16, 17 and 2^k - 1, 2^k, 2^k + 1 up to the step's token budget,
  alone and together, plus a prefix-cache hit (a prefill over cached context) and, where the
  context allows, a prompt longer than the budget (chunked prefill);
* decode and mixed steps: batches of 1, 2, 4, ... ``max_num_seqs`` requests decoding (every
  captured graph size pads to one of these; every decode split count is met on the way), with a
  new prompt joining them (prefill riding on decode, eager);
* the sampler: greedy; temperature with top-k, top-p and min-p; penalties; logprobs and prompt
  logprobs; per-request seeds; logit bias and min_tokens: each alone and all in one batch;
* quantized GEMMs and tensor-parallel collectives run inside every step above;
* multi-LoRA (``--enable-lora``): the prefill shapes and decode batches again with a zero
  adapter, so the LoRA kernels compile now too (``tessellm.lora.warmup``).

On the cpu backend (no Triton JIT; the decode graph is compiled at capture) the plan is one
short request through the full sampler, so tests and the newcomer path stay fast.

Afterwards the synthetic requests leave nothing behind: they finished, their blocks are free,
the prefix-cache statistics are reset, and the plugins' checked calls (``backends/checked.py``),
which checked them, start their checks over for the first real requests.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Optional

from tessellm.core.sampling_params import SamplingParams
from tessellm.lora.warmup import lora_warmup

logger = logging.getLogger(__name__)

_ID_PREFIX = "__warmup-"


@dataclass
class WarmupPlan:
    prefill_lens: list[int]  # each alone, then all in one step
    decode_batches: list[int]  # requests decoding together (a new prompt then joins them)
    samplers: list[SamplingParams]  # each alone, then all in one batch
    prefix_hit_len: int  # a prompt sent twice: the second prefill runs over cached blocks
    chunked_len: Optional[int] = None  # longer than the step budget (None: not possible/cheap)


@dataclass
class WarmupReport:
    seconds: float = 0.0
    requests: int = 0
    steps: int = 0
    skipped: list = field(default_factory=list)


def sampler_variants(vocab_size: int) -> list[SamplingParams]:
    base = dict(max_tokens=3, ignore_eos=True)
    return [
        SamplingParams(temperature=0.0, **base),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, **base),
        SamplingParams(temperature=1.0, **base),
        SamplingParams(temperature=1.0, seed=1234, **base),
        SamplingParams(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.5,
                       repetition_penalty=1.2, **base),
        SamplingParams(temperature=0.0, logprobs=5, prompt_logprobs=5, **base),
        SamplingParams(temperature=0.0, logit_bias={min(1, vocab_size - 1): 2.0}, min_tokens=2, **base),
    ]


def plan_for(core) -> WarmupPlan:
    """The warm-up for this engine: its token budget, context, KV capacity and device."""
    cfg = core.scheduler.config
    capacity = core.info.num_kv_blocks * core.info.block_size
    longest = max(1, min(cfg.max_num_batched_tokens, core.max_model_len - 8, capacity // 2))
    samplers = sampler_variants(core.vocab_size)
    if core.backend.device_type == "cpu":  # nothing is JIT-compiled per shape: one request
        return WarmupPlan([], [], samplers[1:2], prefix_hit_len=0)
    lens = {1, 15, 16, 17}
    for k in range(5, longest.bit_length() + 1):
        lens |= {2 ** k - 1, 2 ** k, 2 ** k + 1}
    lens.add(longest)
    per_request_blocks = 4
    max_batch = min(cfg.max_num_seqs, core.info.num_kv_blocks // per_request_blocks)
    batches = sorted({min(2 ** k, max_batch) for k in range(max_batch.bit_length() + 1)})
    # a prompt past the token budget: chunked prefill, its first chunk a whole budget (the
    # Mamba scan's parallel kernels run only on chunks of ``SSD_MIN_TOKENS`` or more); shorter
    # than the budget plus 64 where the context or the KV cache is too small for that
    chunked = cfg.max_num_batched_tokens + 64
    room = min(core.max_model_len - 8, capacity // 2)
    chunked_len = chunked if chunked <= room else (room if room > longest else None)
    return WarmupPlan(sorted(n for n in lens if n <= longest), batches, samplers,
                      prefix_hit_len=min(4 * core.info.block_size + 3, longest),
                      chunked_len=chunked_len)


class _Driver:
    """Adds synthetic requests to a core and steps it until they finish."""

    def __init__(self, core, seed: int = 0):
        self.core = core
        self.rng = random.Random(seed)
        self.ids = itertools.count()
        self.report = WarmupReport()
        low = min(1000, core.vocab_size // 2)
        self.token_range = (low, core.vocab_size - 1)

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randint(*self.token_range) for _ in range(n)]

    def add(self, prompt: list[int], params: SamplingParams, lora: Optional[dict] = None) -> str:
        from tessellm.core.engine_core import EngineCoreRequest

        rid = f"{_ID_PREFIX}{next(self.ids)}"
        self.core.add_request(EngineCoreRequest(rid, prompt, params, time.time(), lora_request=lora))
        self.report.requests += 1
        return rid

    def step(self, times: Optional[int] = None) -> None:
        """Step ``times`` times, or (None) until the core is idle."""
        n = 0
        while self.core.has_unfinished_requests() and (times is None or n < times):
            self.core.step()
            n += 1
        self.report.steps += n


def run(core, plan: Optional[WarmupPlan] = None) -> WarmupReport:
    """Run the warm-up on an idle ``core``; returns what it did. Leaves the core idle."""
    if core.has_unfinished_requests():
        raise RuntimeError("warm-up needs an idle engine core")
    plan = plan or plan_for(core)
    # A KV connector sits it out: synthetic prompts are neither loaded nor saved.
    connector, core.scheduler.connector = core.scheduler.connector, None
    try:
        return _run(core, plan)
    finally:
        core.scheduler.connector = connector


def _run(core, plan: WarmupPlan) -> WarmupReport:
    d = _Driver(core)
    t0 = time.perf_counter()
    greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for n in plan.prefill_lens:  # each prefill shape alone
        d.add(d.prompt(n), greedy)
        d.step()
    if len(plan.prefill_lens) > 1:  # several prefills in one step
        for n in plan.prefill_lens:
            d.add(d.prompt(n), greedy)
        d.step()
    if plan.prefix_hit_len:
        shared = d.prompt(plan.prefix_hit_len)  # the second prefill runs over cached blocks
        for _ in range(2):
            d.add(list(shared), greedy)
            d.step()
    if plan.chunked_len:
        d.add(d.prompt(plan.chunked_len), greedy)
        d.step()
    _decode_and_mixed(d, plan.decode_batches)
    _samplers(d, plan.samplers)
    lora_warmup(core, lambda lora: _lora_shapes(d, plan, lora))  # with --enable-lora
    _forget(core)
    d.report.seconds = round(time.perf_counter() - t0, 3)
    return d.report


def _decode_and_mixed(d: _Driver, batches: list[int]) -> None:
    for size in batches:
        decoding = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        for _ in range(size):
            d.add(d.prompt(9), decoding)
        d.step(4)  # prefilled, then pure decode steps (graphs where captured)
        d.add(d.prompt(33), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        d.step()  # the new prompt's prefill rides on the decodes: a mixed, eager step


def _lora_shapes(d: _Driver, plan: WarmupPlan, lora: dict) -> None:
    """Multi-LoRA: each prefill shape alone and the decode batches, with an adapter."""
    greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for n in plan.prefill_lens or [8]:
        d.add(d.prompt(n), greedy, lora)
        d.step()
    for size in plan.decode_batches:
        for _ in range(size):
            d.add(d.prompt(9), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), lora)
        d.step()


def _samplers(d: _Driver, samplers: list[SamplingParams]) -> None:
    for params in samplers:
        d.add(d.prompt(8), params)
        d.step()
    if len(samplers) > 1:
        for params in samplers:
            d.add(d.prompt(8), params)
        d.step()


def _forget(core) -> None:
    """Synthetic prompts must not show in the prefix-cache statistics users see."""
    from tessellm.core.block_manager import PrefixCacheStats

    core.kv.stats = PrefixCacheStats()
    if core.kv.host is not None:  # the host KV tier's too (kv_offload.py)
        from tessellm.core.kv_offload import OffloadStats

        core.kv.host.stats = OffloadStats(bytes_per_block=core.kv.host.stats.bytes_per_block)


def enabled(args, serving: bool) -> bool:
    """``kernel_warmup``: None means on when serving, off for ``LLM(...)``."""
    return serving if args.kernel_warmup is None else bool(args.kernel_warmup)


def warm_up(core, args, serving: bool) -> Optional[WarmupReport]:
    """The engine-start hook: warm up when enabled, then start counting Triton compilations as
    'after ready' (``tessellm.metrics.compile_counter``)."""
    from tessellm.metrics import compile_counter

    report = None
    if enabled(args, serving):
        report = run(core)
        core.executor.restart_plugin_checks()  # its synthetic requests were checked; real ones next
        logger.info("Warm-up: %d synthetic requests, %d steps in %.1fs (%d Triton compilation(s) so far)",
                    report.requests, report.steps, report.seconds, compile_counter.COUNTER.total)
    compile_counter.COUNTER.mark_ready()
    core.executor.mark_compile_ready()  # worker processes (TP/PP) count from now on too
    return report
