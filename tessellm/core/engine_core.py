"""EngineCore: scheduler + model runner on one backend. Token ids in, token ids out.

It knows nothing of text: tokenization, detokenization and stop strings live in the front end
(``input_processor`` / ``output_processor``), so in serving the core runs in its own process and
the GPU loop never waits on JSON, HTTP or the tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from tessellm.backends.registry import get_registry
from tessellm.config import (EngineArgs, generation_eos_ids, resolve_async_scheduling, resolve_dtype,
                             resolve_max_model_len, text_config)
from tessellm.core.block_manager import BlockManager
from tessellm.core.kv_offload import GIB, HostKVTier, host_tier_blocks
from tessellm.core.request import Request
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.engine_output import EngineCoreOutput
from tessellm.core.engine_profile import EngineProfile
from tessellm.core.engine_sleep import EngineSleep
from tessellm.core.scheduler import Scheduler, SchedulerConfig
from tessellm.distributed.executor import make_executor
from tessellm.distributed.worker import default_max_num_batched_tokens
from tessellm.generation_config import default_sampling
from tessellm.lora.request import lora_off_error
from tessellm.metrics.kv_residency import KVResidency
from tessellm.multimodal.encoder_budget import encoder_budget_args
from tessellm.multimodal.limits import check_multimodal_args, default_mm_kwargs, model_mm_limits
from tessellm.reasoning.budget import thinking_strings
from tessellm.reasoning.parsers import resolve_reasoning_parser
from tessellm.sample.logits_processor.load import engine_classes, validate_request
from tessellm.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)

# With nothing to compute but a KV connector's background loads, a step waits this long (at
# most) for one to finish: new requests are looked at in between.
_KV_POLL_S = 0.02


@dataclass
class EngineCoreRequest:
    """A request as it crosses into the core (msgpack-friendly: ids and plain params)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    cache_salt: Optional[str] = None
    wait_for: Optional[str] = None  # n > 1: sibling whose prompt blocks this one reuses
    lora_request: Optional[dict] = None  # LoRARequest.to_dict() of its adapter; None: base model
    # Images in the prompt (tessellm.multimodal.inputs.MultiModalFeature); None: text only.
    mm_features: Optional[list] = None
    # A pooling request's task (tessellm.pooling.params.POOLING_TASKS); "token_*" keeps a row
    # per prompt token. None: a generating request, or one pooled as the engine pools.
    pooling_task: Optional[str] = None
    # A prompt given as embeddings (tessellm.core.prompt_embeds.PromptEmbeds); its
    # prompt_token_ids are placeholders. None: a token prompt.
    prompt_embeds: Optional[object] = None
    # vLLM's request priority: under scheduling_policy "priority", lower values first.
    priority: int = 0


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
    # SamplingParams fields a request leaves unset default to (the model's generation_config.json)
    default_sampling: dict = field(default_factory=dict)
    # Items per prompt the model takes, e.g. {"image": 1}; empty: a text-only model.
    mm_limits: dict = field(default_factory=dict)
    runner: str = "generate"  # or "pooling": an embedding model (tessellm.pooling)
    # Pooling engine: PoolerConfig's fields and "matryoshka_dimensions" (None: any size).
    pooling: dict = field(default_factory=dict)
    # The reasoning parser in force: --reasoning-parser, or openai_gptoss for a gpt-oss model.
    reasoning_parser: Optional[str] = None
    # [starts, ends]: the spellings that open and end a model's thinking (the first end is the
    # one a thinking_token_budget forces), from --reasoning-config or the reasoning parser
    # (tessellm/reasoning/budget.py); None: a budget is refused.
    thinking_markers: Optional[list] = None
    # enable_prompt_embeds: the hidden size prompt embeddings must have; 0: they are refused.
    prompt_embeds_hidden_size: int = 0
    # Each rank's device ("cuda:2"), in rank order (data parallelism: /debug/stats shows them).
    devices: list = field(default_factory=list)
    # A KV connector is configured (--kv-transfer-config): requests may carry kv_transfer_params.
    kv_connector: bool = False
    # The KV producers a request's kv_transfer_params may name (the connector's
    # allowed_producers(): "host" or "host:port"); None: any, or a connector that does not route.
    kv_producers: Optional[list] = None
    # --scheduling-policy: "fcfs" or "priority" (only then may a request's priority be non-zero).
    scheduling_policy: str = "fcfs"
    # --mm-processor-kwargs: the image processor settings a request's own are laid over.
    mm_processor_kwargs: dict = field(default_factory=dict)


class EngineCore(EngineSleep, EngineProfile):
    def __init__(self, args: EngineArgs):
        args.validate()
        registry = get_registry()
        self.backend = registry.select(args.device, getattr(args, "emulate", False))
        if self.backend.emulated:  # unmarked at shutdown, or when the engine goes unshut
            from tessellm.backends.emulation import mark_emulated, unmark_emulated

            mark_emulated(self.backend.name)  # (a start that raised, an LLM never shut down)
            self._unmark_emulated = weakref.finalize(self, unmark_emulated, self.backend.name)
        from tessellm.pooling.convert import model_source

        self.source = model_source(args)  # hf_overrides and convert applied
        config = self.source.hf_config
        check_multimodal_args(config, args)
        from tessellm.models import state_space

        state_space.check_engine_args(args, config)  # Mamba layers: what they cannot do yet
        self.dtype = resolve_dtype(args.dtype, config, self.backend.device_type)
        self.max_model_len = resolve_max_model_len(args.max_model_len, text_config(config))
        self.eos_token_ids = generation_eos_ids(self.source)
        self.vocab_size = text_config(config).vocab_size
        if args.tensor_parallel_size > 1 and (args.quantization is not None or
                                              getattr(config, "quantization_config", None) is not None):
            from tessellm.loader.model_loader import check_tensor_parallel_quantization
            from tessellm.quantization.config import resolve_quant_spec

            # Before any worker starts: a refusal names the problem, not a dead rank.
            check_tensor_parallel_quantization(resolve_quant_spec(args.quantization, self.source),
                                               args.tensor_parallel_size)
        from tessellm.pooling.config import pooler_config_for

        self.pooling = pooler_config_for(args, self.source)  # None: the engine generates
        if self.pooling is not None:
            _check_pooling_args(args)
            if args.enable_prompt_embeds:
                raise ValueError("enable_prompt_embeds applies to generating models; this engine "
                                 "pools (embeddings); drop enable_prompt_embeds.")
        # Custom logits processors (given and installed): validate_params checks each request.
        self.logits_processor_classes = engine_classes(args.logits_processors, self.pooling is not None,
                                                      args.speculative_config is not None)
        if self.pooling is not None and self.pooling.bidirectional:  # a prompt runs whole
            from tessellm.pooling.encoder import encoder_args

            args = encoder_args(args, self.max_model_len,
                                default_max_num_batched_tokens(args, self.backend.device_type))
        # Schedule step N+1 while step N runs (scheduler module docstring); a pooling request
        # ends with its prompt, so there is no step to schedule ahead of.
        self.async_scheduling = (resolve_async_scheduling(args, self.backend.device_type)
                                 and self.pooling is None)
        max_batched = default_max_num_batched_tokens(args, self.backend.device_type)
        # Image models: the encoder budget (refused here, before any worker starts).
        encoder_budget = encoder_budget_args(config, max_batched, args.disable_chunked_mm_input,
                                             self.source.path)
        t0 = time.perf_counter()
        # One worker per device: in this process for one device, else processes or Ray actors
        # (tessellm.distributed.executor). Every rank sizes its KV cache; the smallest wins.
        self.executor = make_executor(args, self.async_scheduling)
        try:
            num_blocks = self.executor.num_kv_blocks()
            self.executor.initialize_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        self.parallel = self.executor.parallel
        logger.info("Loaded %s on %s (%d rank(s)) in %.1fs; KV cache: %d blocks x %d tokens = %d tokens",
                    self.source.path, self.backend.name, self.parallel.world_size,
                    time.perf_counter() - t0, num_blocks, args.block_size, num_blocks * args.block_size)
        prefix_caching = args.enable_prefix_caching
        if self.pooling is not None and prefix_caching and not self.pooling.prefix_caching_ok:
            logger.info("%s pooling reads every prompt token's hidden state: prefix caching is off.",
                        self.pooling.pooling_type)
            prefix_caching = False
        try:  # recurrent layers: prefix hits start from state snapshots (core/state_prefix.py)
            states = state_space.state_snapshots(prefix_caching, config, self.executor)
        except BaseException:
            self.executor.shutdown()
            raise
        if state_space.has_recurrent_state(config):
            prefix_caching = states is not None
        self.kv = BlockManager(num_blocks, args.block_size, prefix_caching)
        self.kv.states = states
        if states is not None:
            states.every = args.recurrent_state_snapshot_interval
        if args.kv_offloading_size is not None:
            self.kv.host = self._host_kv_tier(args)
        if args.kv_cache_metrics:  # sampled block residency (docs/metrics.md)
            self.kv.residency = KVResidency(args.kv_cache_metrics_sample)
        self.scheduler = Scheduler(SchedulerConfig(args.max_num_seqs, max_batched, self.max_model_len,
                                                   args.enable_chunked_prefill,
                                                   self.parallel.pipeline_parallel_size,
                                                   self.async_scheduling,
                                                   defer_grammar=self.async_scheduling
                                                   and self.executor.supports_deferred_sample
                                                   and args.speculative_config is None,
                                                   pooling=self.pooling is not None,
                                                   policy=args.scheduling_policy,
                                                   **_speculation(args),
                                                   **encoder_budget),
                                   self.kv)
        if args.kv_transfer_config is not None:
            self.scheduler.connector = self._kv_connector(args)
        # Steps in flight at most: one per pipeline stage, or two under async scheduling.
        self.max_in_flight = 2 if self.async_scheduling else self.executor.max_concurrent_batches
        self.info = EngineInfo(self.source.path, self.source.kind, self.max_model_len, self.vocab_size,
                               num_blocks, args.block_size, self.eos_token_ids, self.backend.name,
                               str(self.dtype).replace("torch.", ""),
                               default_sampling(self.source.path if self.source.kind == "dir" else None,
                                                getattr(args, "generation_config", "auto"),
                                                getattr(args, "override_generation_config", None)),
                               model_mm_limits(config, args),
                               *_pooling_info(self.pooling, config),
                               reasoning_parser=resolve_reasoning_parser(
                                   getattr(args, "reasoning_parser", None), config),
                               prompt_embeds_hidden_size=(text_config(config).hidden_size
                                                          if args.enable_prompt_embeds else 0),
                               devices=[str(w.get("device")) for w in self.executor.worker_info],
                               kv_connector=self.scheduler.connector is not None,
                               kv_producers=(None if self.scheduler.connector is None
                                             else self.scheduler.connector.allowed_producers()),
                               scheduling_policy=args.scheduling_policy,
                               mm_processor_kwargs=default_mm_kwargs(args, self.source.path, config))
        markers = thinking_strings(self.info.reasoning_parser, getattr(args, "reasoning_parser_plugin", None),
                                   getattr(args, "reasoning_config", None))
        self.info.thinking_markers = None if markers is None else [list(m) for m in markers]
        # Grammars of constrained requests: compiled in a thread pool, masks filled per step.
        self.structured = StructuredOutputManager(
            lambda: _load_tokenizer(self.source, args.tokenizer), self.vocab_size, self.eos_token_ids,
            self.info.reasoning_parser, getattr(args, "reasoning_parser_plugin", None))
        upload = getattr(getattr(getattr(self.executor, "worker", None), "runner", None), "mask_upload", None)
        if upload is not None and upload.pinned:  # fill masks straight into the runner's pinned buffers
            self.structured.host_buffer = upload.host_buffer
        self._deferred_sample = None  # (step, its background mask fill): launched, not yet sampled
        self.lora_store = self._lora_slots(args)  # None without enable_lora
        self.enable_sleep_mode = args.enable_sleep_mode
        self.asleep: dict[str, int] = {}  # sleep mode: tag ("weights", "kv_cache") -> level

    def _host_kv_tier(self, args: EngineArgs) -> HostKVTier:
        """The prefix cache's host tier: its blocks from ``kv_offloading_size`` over the bytes
        of a block on every rank; each rank allocates its own part (docs/kv_offload.md)."""
        try:
            if not self.kv.enable_prefix_caching:  # a pooling model that reads every position
                raise ValueError("kv_offloading_size keeps evicted prefix-cache blocks, but prefix "
                                 "caching is off for this model; drop kv_offloading_size.")
            per_block = sum(self.executor.collective_rpc("kv_block_bytes"))
            num_blocks = host_tier_blocks(args.kv_offloading_size, per_block)
            self.executor.collective_rpc("initialize_host_cache", num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        logger.info("KV offloading: a host tier of %d blocks (%.2f GiB over %d rank(s))", num_blocks,
                    num_blocks * per_block / GIB, self.parallel.world_size)
        return HostKVTier(num_blocks, per_block)

    def _kv_connector(self, args: EngineArgs):
        """The KV connector's scheduler half here, its worker half on every rank
        (docs/kv_transfer.md); keyed by a namespace of what makes blocks interchangeable."""
        from tessellm.kv_transfer import KVConnectorContext, KVConnectorRole, make_connector
        from tessellm.kv_transfer.config import parse_kv_transfer_config

        try:
            if not self.kv.enable_prefix_caching:  # recurrent state, or a pooling model
                raise ValueError("kv_transfer_config keys KV blocks by their prefix hashes, but "
                                 "prefix caching is off for this model; drop kv_transfer_config.")
            config = parse_kv_transfer_config(args.kv_transfer_config)
            rank_bytes = self.executor.collective_rpc("kv_block_bytes")
            context = KVConnectorContext(args.block_size, self._kv_namespace(args, rank_bytes),
                                         self.parallel.world_size, 0, rank_bytes)
            connector = make_connector(config, KVConnectorRole.SCHEDULER, context)
            self.executor.collective_rpc("initialize_kv_connector", config.to_dict(),
                                         context.to_dict())
        except BaseException:
            self.executor.shutdown()
            raise
        logger.info("KV connector %s (%s) over namespace %s", config.kv_connector, config.kv_role,
                    context.namespace)
        return connector

    def _kv_namespace(self, args: EngineArgs, rank_bytes: list) -> str:
        """A digest of the model (its config, and its weight files: path, size, modification
        time; equal configs of other weights must never share KV), how it is loaded and
        quantized, the dtypes, the block size, the parallel layout, the drafter and each rank's
        block bytes and cache tensors' layout (a heads-major cache is another namespace)."""
        import hashlib
        import json

        config = self.source.hf_config.to_dict()
        config.pop("_name_or_path", None)
        what = [config, _weight_files(self.source.path), args.load_format, args.quantization,
                args.hf_overrides, args.seed if args.load_format == "dummy" else None,
                str(self.dtype), args.kv_cache_dtype, args.block_size,
                self.parallel.tensor_parallel_size, self.parallel.pipeline_parallel_size,
                args.speculative_config, rank_bytes, self.executor.collective_rpc("kv_cache_layout")]
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def _lora_slots(self, args: EngineArgs):
        """Adapter slots in the scheduler over a host cache read by a background thread; a
        runner in this process reads the same cache (workers in processes keep their own)."""
        from tessellm.lora.config import LoRAConfig

        config = LoRAConfig.from_args(args)
        if config is None:
            return None
        from tessellm.lora.shapes import BaseShapes
        from tessellm.lora.slots import LoRASlots
        from tessellm.lora.store import AdapterStore

        shapes = BaseShapes.from_config(self.source.hf_config, args.quantization)
        store = AdapterStore(shapes, config.max_lora_rank, config.max_cpu_loras)
        self.scheduler.lora = LoRASlots(config.max_loras, store)
        worker = getattr(self.executor, "worker", None)
        if worker is not None:
            worker.runner.lora.share_store(store)
        return store

    def add_lora(self, lora) -> None:
        """Read and check an adapter now (offline ``LLM``: a bad one raises ValueError here,
        before any request names it)."""
        if self.lora_store is None:
            raise lora_off_error(lora)
        self.lora_store.claim(lora)
        if not self.lora_store.ready(lora.lora_int_id):
            self.lora_store.forget_error(lora.lora_int_id)
            self.lora_store.load_now(lora)

    def remove_lora(self, lora_id: int) -> None:
        """Forget an adapter (the server unloaded its name): its slot and cached weights go once
        no running request uses it (``LoRASlots.drop``). Unknown ids are ignored."""
        if self.scheduler.lora is not None:
            self.scheduler.lora.drop(lora_id)

    @property
    def in_flight(self):
        """Steps submitted and not collected, oldest first (several only with pipeline stages or
        async scheduling): the scheduler's ``InFlightSteps``, the one record of them."""
        return self.scheduler.in_flight

    @property
    def runner(self):
        """The model runner, when it lives in this process (one device)."""
        worker = getattr(self.executor, "worker", None)
        if worker is None:
            raise AttributeError("The model runs in worker processes; there is no runner here.")
        return worker.runner

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache dtype (fp8 with kv_cache_dtype="fp8"), as every rank allocates it."""
        return getattr(torch, self.executor.worker_info[0]["kv_dtype"])

    def shutdown(self) -> None:
        self._deferred_sample = None
        self.structured.shutdown()
        if self.lora_store is not None:
            self.lora_store.shutdown()
        connector = getattr(getattr(self, "scheduler", None), "connector", None)
        if connector is not None:  # its scheduler half (the workers' go with them)
            try:
                connector.shutdown()
            except Exception:  # noqa: BLE001 - a connector's failure never blocks the shutdown
                logger.exception("The KV connector's scheduler half failed to shut down.")
        self.executor.shutdown()
        if self.backend.emulated:
            self._unmark_emulated()  # once: a finalize runs at most once

    # -- the engine loop -------------------------------------------------------------------

    def add_request(self, req: EngineCoreRequest) -> None:
        if self.asleep:
            from tessellm.core.runner_sleep import EngineAsleepError

            raise EngineAsleepError(f"The engine is asleep ({', '.join(sorted(self.asleep))}); call "
                                    "wake_up() before sending requests.")
        if req.sampling_params.kv_transfer_params is not None and self.scheduler.connector is None:
            raise ValueError("The request carries kv_transfer_params but the engine runs without a "
                             "KV connector; start it with --kv-transfer-config (docs/kv_transfer.md) "
                             "or leave kv_transfer_params out.")
        params = req.sampling_params
        if params.thinking_token_budget is not None and not (params.thinking_start_ids and params.thinking_end_ids):
            raise ValueError("The request has a thinking_token_budget but not the reasoning markers' ids "
                             "(SamplingParams.thinking_start_ids / thinking_end_ids, which the front end "
                             "fills); submit it through LLM / AsyncLLM / the server, or set them.")
        if params.thinking_token_budget is not None:  # a forced id past the vocabulary fails the step
            bad = [t for m in params.thinking_start_ids + params.thinking_end_ids for t in m if t >= self.vocab_size]
            if bad:
                raise ValueError(f"The reasoning markers' ids ({bad[0]}) are outside the model's vocabulary "
                                 f"[0, {self.vocab_size}); give --reasoning-config markers this model's "
                                 "tokenizer spells with its own tokens.")
        lora = None
        if req.lora_request is not None:
            from tessellm.lora.request import LoRARequest

            if self.lora_store is None:
                raise ValueError("The request names a LoRA adapter but the engine runs without "
                                 "LoRA; start it with --enable-lora (enable_lora=True).")
            lora = LoRARequest.from_dict(req.lora_request)
            self.lora_store.claim(lora)
        request = Request(req.request_id, req.prompt_token_ids, req.sampling_params,
                          self.eos_token_ids, req.arrival_time, req.cache_salt, req.wait_for, lora,
                          req.mm_features, req.pooling_task, req.prompt_embeds, req.priority)
        if lora is not None:
            self.lora_store.ensure(lora)  # read off the step loop, before it is scheduled
            self.scheduler.lora.announce(lora)  # worker processes read it in their own thread
        self.scheduler.check_fits(request)
        if self.logits_processor_classes:
            validate_request(self.logits_processor_classes, req.sampling_params)
        if req.sampling_params.structured_outputs is not None:
            request.grammar = self.structured.grammar_for(req.sampling_params.structured_outputs,
                                                          req.prompt_token_ids,
                                                          req.sampling_params.reasoning_phase)
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        # A KV connector's saves not yet reported settled: the engine polls until they are,
        # so its stats count every block written (LLM.generate returns once they are)
        return (self.scheduler.has_unfinished() or bool(self.in_flight)
                or self._kv_saves_in_flight())

    def _kv_saves_in_flight(self) -> bool:
        connector = self.scheduler.connector
        return connector is not None and connector.stats.saves_in_flight > 0

    def step(self) -> list[EngineCoreOutput]:
        """Schedule and run one step; return what requests produced.

        With pipeline stages or async scheduling, up to ``max_in_flight`` steps are in flight:
        while one is free, a new batch is submitted and the call returns at once; otherwise it
        waits for the oldest step and returns its outputs. Under async scheduling the new batch
        is launched on the device before the oldest is waited for; a constrained request's mask
        for it is then filled after the oldest step's update, in the background while the
        caller takes the outputs and the next call schedules, and the step samples at the start
        of that next call, before anything else is launched (``grammar_deferred``,
        structured_output/manager.py). The device runs the step's forward pass meanwhile.
        """
        sched = self.scheduler.schedule()  # a non-empty step is in flight from here
        ended = self.scheduler.take_finished_outputs()
        self._sample_deferred()
        deferred = False
        if not sched.is_empty:
            requests = self.scheduler.requests
            deferred = self.structured.must_defer(sched, self.in_flight, requests)
            if deferred:  # needs the tokens of the step in flight: mask after its update
                sched.grammar_deferred = True
            else:
                self.structured.fill_bitmask(sched, requests)
            self.executor.submit(sched)
            if len(self.in_flight) < self.max_in_flight:  # (never deferred: no older step)
                return ended
        elif not self.in_flight:
            if self.scheduler.kv_loading:  # only background KV loads under way: wait for one
                loaded = self.executor.collective_rpc("poll_kv_loads", self.scheduler.kv_poll_meta(),
                                                      _KV_POLL_S)[0]
                self.scheduler.finish_kv_loads(loaded)
                return ended
            if self.scheduler.connector is not None:
                if self.scheduler.kv_lookups_pending():  # connector lookups off the step
                    self.scheduler.connector.wait_for_lookups(_KV_POLL_S)
                    return ended
                if self._kv_saves_in_flight():  # only saves under way: their counts
                    settled = self.executor.collective_rpc("poll_kv_saves", _KV_POLL_S)[0]
                    if settled:
                        self.scheduler.connector.stats.record_saves(settled)
                    if not self.scheduler.waiting:
                        return ended
            self.structured.wait_for_compiles(self.scheduler.waiting)  # instead of spinning
            if self.lora_store is not None:
                self.lora_store.wait_any(0.05)  # adapters still loading: wait, do not spin
            return ended
        oldest = self.in_flight.oldest()
        result = self.executor.collect()
        outputs = ended + self.scheduler.update(oldest, result)
        if deferred:  # the matchers have the collected step's tokens: the new step's mask
            self._defer_sample(sched, background=self.structured.background_fill)
        return outputs

    def _defer_sample(self, sched, background: bool) -> None:
        fill = self.structured.fill_bitmask(sched, self.scheduler.requests, background=background)
        self._deferred_sample = (sched, fill)
        if fill is None:
            self._sample_deferred()

    def _sample_deferred(self) -> None:
        """The launched step waiting for its mask samples now (its fill done)."""
        pending, self._deferred_sample = self._deferred_sample, None
        if pending is not None:
            sched, fill = pending
            if fill is not None:
                fill.result()
            self.executor.sample_deferred(sched.grammar_bitmask, sched.grammar_bitmask_rows)


def _check_pooling_args(args: EngineArgs) -> None:
    """What a pooling engine cannot do, refused before anything loads."""
    for name, bad, fix in (
            ("async_scheduling", args.async_scheduling is True, "leave it unset"),
            ("speculative_config", args.speculative_config is not None, "leave it unset"),
            ("pipeline_parallel_size", args.pipeline_parallel_size > 1, "use tensor_parallel_size")):
        if bad:
            raise ValueError(f"{name} does not apply to a pooling (embedding) engine; {fix}.")


def _pooling_info(pooling, hf_config) -> tuple[str, dict]:
    """EngineInfo's ``runner`` and ``pooling`` fields."""
    if pooling is None:
        return "generate", {}
    from tessellm.pooling.params import matryoshka_dimensions

    return "pooling", {**dataclasses.asdict(pooling), "matryoshka_dimensions": matryoshka_dimensions(hf_config)}


def _speculation(args: EngineArgs) -> dict:
    """The scheduler's speculative-decoding fields (none without a speculative_config)."""
    from tessellm.spec_decode.config import parse_speculative_config

    config = parse_speculative_config(args.speculative_config)
    if config is None:
        return {}
    return dict(num_lookahead_tokens=config.num_lookahead_tokens,
                num_speculative_tokens=config.num_speculative_tokens,
                disable_by_batch_size=config.disable_by_batch_size)


def _load_tokenizer(source, tokenizer_dir: Optional[str]):
    """The model's HF tokenizer, for grammar compilation (loaded on first use), or None."""
    if not (source.has_tokenizer or tokenizer_dir):
        return None
    from tessellm.loader.model_loader import load_tokenizer

    return load_tokenizer(source.path, source.kind, tokenizer_dir)


def _weight_files(path: str) -> list:
    """(real path, bytes, modification time) of a model's weight files: the KV connector's
    namespace tells other weights under an equal config apart."""
    import os

    path = os.path.realpath(path)
    names = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, n) for n in os.listdir(path)
        if n.endswith((".safetensors", ".bin", ".pt", ".gguf")))
    out = []
    for name in names:
        st = os.stat(name)
        out.append([name, st.st_size, st.st_mtime_ns])
    return out
