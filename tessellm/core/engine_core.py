"""EngineCore: scheduler + model runner on one backend. Token ids in, token ids out.

It knows nothing of text: tokenization, detokenization and stop strings live in the front end
(``input_processor`` / ``output_processor``), so in serving the core runs in its own process and
the GPU loop never waits on JSON, HTTP or the tokenizer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from tessellm.backends.registry import get_registry
from tessellm.backends.spec import GraphSpec
from tessellm.config import (EngineArgs, generation_eos_ids, resolve_dtype, resolve_max_model_len,
                             resolve_model)
from tessellm.core.block_manager import BlockManager
from tessellm.core.model_runner import ModelRunner
from tessellm.core.request import Request
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.scheduler import EngineCoreOutput, Scheduler, SchedulerConfig
from tessellm.envs import cpu_kv_cache_bytes

logger = logging.getLogger(__name__)

_CPU_KV_CACHE_DEFAULT = 4 << 30


@dataclass
class EngineCoreRequest:
    """A request as it crosses into the core (msgpack-friendly: ids and plain params)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    cache_salt: Optional[str] = None
    wait_for: Optional[str] = None  # n > 1: sibling whose prompt blocks this one reuses


@dataclass
class EngineInfo:
    """What a front end needs to know about the core to validate requests at the edge."""

    model_path: str
    model_kind: str
    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int
    eos_token_ids: list[int]
    backend: str
    dtype: str


class EngineCore:
    def __init__(self, args: EngineArgs):
        args.validate()
        registry = get_registry()
        self.backend = registry.select(args.device)
        self.device = self.backend.torch_device()
        self.source = resolve_model(args.model)
        config = self.source.hf_config
        self.dtype = resolve_dtype(args.dtype, config, self.backend.device_type)
        self.max_model_len = resolve_max_model_len(args.max_model_len, config)
        self.eos_token_ids = generation_eos_ids(self.source)
        torch.manual_seed(args.seed)
        load_format = args.load_format if args.load_format != "auto" else self.source.kind
        from tessellm.loader.model_loader import build_model

        t0 = time.perf_counter()
        model, kernel = build_model(self.source, load_format, registry, self.backend, self.dtype,
                                    self.device, args.block_size, args.kv_cache_dtype, args.seed,
                                    quantization=args.quantization)
        from tessellm.quantization.support import kv_cache_torch_dtype

        self.kv_dtype = kv_cache_torch_dtype(kernel, self.dtype)  # fp8 with kv_cache_dtype="fp8"
        self.vocab_size = config.vocab_size
        graphs = registry.graph_runner(self.backend, GraphSpec(args.max_num_seqs, args.enforce_eager,
                                                               dtype=self.dtype))
        self.runner = ModelRunner(model, kernel, self.backend, self.device, args.block_size,
                                  self.vocab_size, tuple(self.eos_token_ids), args.seed,
                                  self.max_model_len, graphs)
        # Large prefill chunks keep accelerator GEMMs compute-bound (measured on an H200: 8192-token
        # steps ran prefill at ~400 TFLOP/s, 16384-token steps at ~710; benchmarks/README.md).
        max_batched = args.max_num_batched_tokens or (2048 if self.backend.device_type == "cpu" else 16384)
        num_blocks = self._num_kv_blocks(args, max_batched)
        self.runner.allocate_kv_cache(num_blocks, self.kv_dtype)
        self.runner.capture_graphs()
        logger.info("Loaded %s on %s in %.1fs; KV cache: %d blocks x %d tokens = %d tokens",
                    self.source.path, self.backend.name, time.perf_counter() - t0, num_blocks,
                    args.block_size, num_blocks * args.block_size)
        self.kv = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(args.max_num_seqs, max_batched, self.max_model_len,
                                                   args.enable_chunked_prefill), self.kv)
        self.info = EngineInfo(self.source.path, self.source.kind, self.max_model_len, self.vocab_size,
                               num_blocks, args.block_size, self.eos_token_ids, self.backend.name,
                               str(self.dtype).replace("torch.", ""))

    def _num_kv_blocks(self, args: EngineArgs, max_batched: int) -> int:
        per_block = self.runner.kv_bytes_per_block(self.kv_dtype)
        cap = args.max_num_seqs * -(-self.max_model_len // args.block_size)  # never need more
        if args.num_kv_blocks is not None:
            return args.num_kv_blocks
        if self.backend.device_type == "cpu":
            budget = cpu_kv_cache_bytes() or _CPU_KV_CACHE_DEFAULT
        else:
            budget = self._device_budget(args, max_batched)
        blocks = min(cap, budget // per_block)
        if blocks < 1:
            raise RuntimeError(f"No memory is left for the KV cache on {self.backend.name} "
                               "after loading the model; raise gpu_memory_utilization or use a "
                               "smaller model.")
        return int(blocks)

    def _device_budget(self, args: EngineArgs, max_batched: int) -> int:
        """Run one forward at the largest step size, then take what is left of the card."""
        self.runner.profile_run(max_batched)
        free, total = self.backend.memory_info()
        return int(free - total * (1 - args.gpu_memory_utilization))

    # -- the engine loop -------------------------------------------------------------------

    def add_request(self, req: EngineCoreRequest) -> None:
        request = Request(req.request_id, req.prompt_token_ids, req.sampling_params,
                          self.eos_token_ids, req.arrival_time, req.cache_salt, req.wait_for)
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        ended = self.scheduler.take_finished_outputs()
        if sched.is_empty:
            return ended
        result = self.runner.execute(sched)
        outputs = self.scheduler.update(sched, result.sampled)
        for out in outputs:
            out.logprobs = result.logprobs.get(out.request_id)
            out.prompt_logprobs = result.prompt_logprobs.get(out.request_id)
        return ended + outputs
