"""A worker: one rank's device, its part of the model, and the model runner over it.

The engine core builds one in-process for a single device (``UniProcExecutor``), or the
executors start one per rank in their own processes (``mp``) or Ray actors (``ray``).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from tessellm.backends.registry import get_registry
from tessellm.backends.spec import GraphSpec, LogitsOpsSpec
from tessellm.config import (EngineArgs, generation_eos_ids, resolve_dtype, resolve_max_model_len,
                             text_config)
from tessellm.core.model_runner import ModelRunner, StepHandle
from tessellm.core.decode_overlap import settings as overlap_settings
from tessellm.core.step import SchedulerOutput
from tessellm.distributed.parallel_state import ParallelConfig, PipelineStage, TensorParallel, init_distributed
from tessellm import envs
from tessellm.envs import cpu_kv_cache_bytes, recurrent_state_device_graphs

logger = logging.getLogger(__name__)

_CPU_KV_CACHE_DEFAULT = 4 << 30
# Prefix caching for recurrent-state models: the share of the KV budget its state snapshots
# may take when recurrent_state_snapshots is unset (core/state_prefix.py).
STATE_SNAPSHOT_SHARE = 0.25


def default_max_num_batched_tokens(args: EngineArgs, device_type: str) -> int:
    # Large prefill chunks keep accelerator GEMMs compute-bound (measured on an H200: 8192-token
    # steps ran prefill at ~400 TFLOP/s, 16384-token steps at ~710; benchmarks/README.md).
    return args.max_num_batched_tokens or (2048 if device_type == "cpu" else 16384)


@dataclass
class WorkerInfo:
    rank: int
    device: str
    kv_dtype: str  # of the cache this rank allocates ("bfloat16", "float8_e4m3fn", ...)
    num_attention_layers: int


class Worker:
    def __init__(self, args: EngineArgs, rank: int = 0, parallel: ParallelConfig = ParallelConfig(),
                 init_method: Optional[str] = None, local_rank: Optional[int] = None):
        from tessellm.metrics.compile_counter import COUNTER

        COUNTER.install()  # this process's Triton compilations (reported to the core by rank)
        registry = get_registry()
        self.args = args
        self.rank = rank
        self.parallel = parallel
        # The KV sizing's numbers on an accelerator (num_kv_blocks: the profile step's peak, the
        # graphs' reserve, free and total bytes; initialize_cache adds the graphs' pools after
        # capture); None where no profile ran (cpu, or an explicit num_kv_blocks).
        self.memory_profile: Optional[dict] = None
        self.num_state_snapshots = 0  # prefix caching's recurrent-state snapshots (num_kv_blocks)
        self.backend = registry.select(args.device, getattr(args, "emulate", False))
        self._place(local_rank, init_method)
        from tessellm.pooling.config import pooler_config_for
        from tessellm.pooling.convert import model_source
        from tessellm.quantization.support import kv_cache_torch_dtype
        from tessellm.spec_decode.runner_part import build_spec_decode

        source = model_source(args)  # hf_overrides and convert applied, as in the engine core
        self.source = source
        self.dtype = resolve_dtype(args.dtype, source.hf_config, self.backend.device_type)
        config = text_config(source.hf_config)  # the language model's (LLaVA: text_config)
        self.max_model_len = resolve_max_model_len(args.max_model_len, config)
        torch.manual_seed(args.seed)  # the same on every rank: tensor-parallel ranks sample alike
        pooling = pooler_config_for(args, source)  # None: a generating model
        t0 = time.perf_counter()
        model, kernel = self._build_model(registry, pooling is not None)
        self.kv_dtype = kv_cache_torch_dtype(kernel, self.dtype)  # fp8 with kv_cache_dtype="fp8"
        if getattr(model, "supports_images", False):  # LoRA on the language model's layers
            lora = _lora_state(args, model.language_model, registry, self.backend,
                               source.hf_config, self.device, self.dtype)  # (lora/shapes.py)
        else:
            lora = _lora_state(args, model, registry, self.backend, config, self.device, self.dtype)
        self.fast_all_reduce = self.tp.enable_fast_all_reduce(self.device, self.dtype)
        graphs = self._graph_runner(registry, model, pooling is not None)
        spec = build_spec_decode(args, model, kernel, self.backend, self.device, self.dtype,
                                 self.max_model_len, config.vocab_size, self.tp, registry)
        self.runner = ModelRunner(model, kernel, self.backend, self.device, args.block_size,
                                  config.vocab_size, tuple(generation_eos_ids(source)), args.seed,
                                  self.max_model_len, graphs, pp=self.pp, dtype=self.dtype,
                                  logits_ops=registry.provider("tessellm_logits_ops", self.backend,
                                                               LogitsOpsSpec(torch.float32))[0],
                                  spec=spec, verify_graph_factory=_verify_graph_factory(
                                      registry, self.backend, graphs, self.dtype),
                                  lora=lora, pooler=_pooler(pooling, model),
                                  decode_overlap=overlap_settings(args),
                                  max_num_seqs=args.max_num_seqs,
                                  compute_nans=envs.compute_nans_in_logits())
        self._runner_inputs(model, spec)
        if pooling is None and self.pp.is_last:  # the rank samples: its custom logits processors
            self.runner.logitsprocs = _logits_processors(args, source, self.max_model_len, self.dtype,
                                                         config.vocab_size, self.runner.sampler.device)
        self.max_num_batched_tokens = default_max_num_batched_tokens(args, self.backend.device_type)
        if hasattr(graphs, "max_num_tokens"):  # a plan of step shapes to compile (tpu)
            graphs.max_num_tokens = self.max_num_batched_tokens
        logger.info("Rank %d: loaded %s on %s (backend %s) in %.1fs", rank, source.path,
                    self.device, self.backend.name, time.perf_counter() - t0)

    def _place(self, local_rank: Optional[int], init_method: Optional[str]) -> None:
        """This rank's device (``local_rank``, else from the data-parallel rank's group and the
        rank), made the process's current one, its CPU threads where several ranks share the
        host, and its tensor / pipeline groups (``self.tp`` / ``self.pp``)."""
        args, parallel = self.args, self.parallel
        dp_size = getattr(args, "data_parallel_size", 1)
        if parallel.world_size * dp_size > 1:
            set_worker_threads(self.backend.device_type, parallel.world_size * dp_size)
        if local_rank is None:  # this host's devices: the data-parallel rank's group, then the rank
            local_rank = device_index(args, parallel, self.rank)
            check_device_index(self.backend, local_rank, args, parallel)
        self.device = self.backend.torch_device(local_rank)
        if self.device.type != "cpu":  # this rank's device becomes the process's current one
            _set_current_device(self.device)
        if parallel.world_size > 1:
            self.tp, self.pp = init_distributed(parallel, self.rank, self.backend.dist_backend,
                                                init_method, self.device)
        else:
            self.tp, self.pp = TensorParallel(), PipelineStage()

    def _build_model(self, registry, pooling: bool):
        """``(model, attention kernel)``: this rank's shard of the model, weights loaded; its
        kernels given the engine's limits (``attention_rows``: verify steps' rows too)."""
        from tessellm.loader.model_loader import build_model
        from tessellm.loader.sharded_state import extra_config_pattern

        args, source = self.args, self.source
        load_format = args.load_format if args.load_format != "auto" else source.kind
        return build_model(source, load_format, registry, self.backend, self.dtype,
                           self.device, args.block_size, args.kv_cache_dtype, args.seed,
                           quantization=args.quantization, tp=self.tp, pp=self.pp,
                           pattern=extra_config_pattern(args.model_loader_extra_config, args.load_format),
                           pooling=pooling, max_positions=rope_positions(args, self.max_model_len),
                           expert_parallel=args.enable_expert_parallel,
                           max_model_len=self.max_model_len,
                           max_num_seqs=attention_rows(args, self._may_capture(pooling)))

    def _may_capture(self, pooling: bool) -> bool:
        """Whether the decode step may be captured, as far as known before the model is built
        (``_graph_runner``: none for pipeline stages, pooling, enforce_eager, an emulated
        backend)."""
        return not (self.pp.num_stages > 1 or pooling or self.args.enforce_eager
                    or self.backend.emulated)

    def _graph_runner(self, registry, model, pooling: bool):
        """The backend's graph runner for the decode step, or None: pipeline stages exchange
        tensors and pooling steps are prefills, so both run eagerly. Eager graphs (none
        captured) with enforce_eager, an emulated backend, or a recurrent-state model on a
        device with TESSELLM_RECURRENT_STATE_GRAPHS=0 (envs.py)."""
        if self.pp.num_stages > 1 or pooling:
            return None
        eager = self.args.enforce_eager or self.backend.emulated  # no device graphs on the host
        if (hasattr(model, "mamba_layers") and self.backend.device_type != "cpu"
                and not recurrent_state_device_graphs()):
            eager = True
        return registry.graph_runner(self.backend, GraphSpec(self.args.max_num_seqs, eager,
                                                             dtype=self.dtype))

    def _runner_inputs(self, model, spec) -> None:
        """The runner's per-model parts: a recurrent-state slot per running request (with
        speculative decoding spare slots for each verified token), and prompt embeddings
        (enable_prompt_embeds) where the model takes them."""
        args = self.args
        if hasattr(model, "mamba_layers"):
            from tessellm.core.mamba_state import MambaStateCache

            if self.runner.buckets is not None:
                raise ValueError(f"Models with Mamba layers do not run on backend "
                                 f"{self.backend.name!r} yet: its steps are padded to shape "
                                 "buckets (XLA), which the Mamba ops do not take; use cpu, cuda "
                                 "or rocm.")
            self.runner.mamba = MambaStateCache(
                model.mamba_layers(), args.max_num_seqs, self.device, self.dtype,
                spec.config.num_speculative_tokens if spec is not None else 0)
        if getattr(args, "enable_prompt_embeds", False):
            from tessellm.core.prompt_embeds import check_model_takes_embeds

            check_model_takes_embeds(model)
            self.runner.prompt_embeds = True

    def mark_compile_ready(self) -> None:
        """Warm-up ended (the executor's ``mark_compile_ready``)."""
        from tessellm.metrics.compile_counter import COUNTER

        COUNTER.mark_ready()

    def restart_plugin_checks(self) -> None:
        """Warm-up ended: this process's checked plugin calls check their next calls again
        (``BackendRegistry.restart_checks``), so the first real requests are checked too."""
        get_registry().restart_checks()

    def compile_counts(self) -> dict:
        """This process's Triton compilations: in all, after ready, and whether warm-up ended."""
        from tessellm.metrics.compile_counter import COUNTER

        return {"total": COUNTER.total, "after_ready": COUNTER.after_ready, "ready": COUNTER.ready}

    def info(self) -> dict:
        return {"rank": self.rank, "device": str(self.device),
                "kv_dtype": str(self.kv_dtype).replace("torch.", ""),
                "num_attention_layers": len(self.runner.model.attention_layers()),
                "graphs": self.runner.graph_runner is not None,
                "fast_all_reduce": self.fast_all_reduce}

    def num_kv_blocks(self) -> int:
        """How many KV blocks this rank can hold (the engine takes the smallest over ranks)."""
        args = self.args
        per_block = self.runner.kv_bytes_per_block(self.kv_dtype)
        cap = args.max_num_seqs * -(-self.max_model_len // args.block_size)  # never need more
        if args.num_kv_blocks is not None:
            self.num_state_snapshots = self._state_snapshots(None, args.num_kv_blocks)
            return args.num_kv_blocks
        if self.backend.device_type == "cpu":
            # The cpu budget is for the whole engine: split it over the ranks on this host
            # (every rank of every data-parallel core).
            ranks = self.parallel.world_size * getattr(args, "data_parallel_size", 1)
            budget = (cpu_kv_cache_bytes() or _CPU_KV_CACHE_DEFAULT) // ranks
            if self.runner.mamba is not None:  # the recurrent states share the budget
                budget -= self.runner.mamba.nbytes
        else:
            self.runner.profile_run(self.max_num_batched_tokens)
            free, total = self.backend.memory_info()
            budget = int(free - total * (1 - args.gpu_memory_utilization))
            graphs = self.runner.graph_memory_estimate()  # allocated after the cache
            if self.runner.spec is not None:  # and a drafter's own graphs
                graphs += self.runner.spec.graph_memory_estimate(self.runner.logits_row_bytes)
            budget -= graphs
            self.memory_profile = {"profile_peak": self.runner.profile_peak_bytes,
                                   "graph_estimate": graphs, "free": free, "total": total}
            if self.runner.spec is not None:
                self.memory_profile["draft_peak"] = self.runner.spec.profile_peak_bytes
            logger.info("Rank %d: memory profile of %d tokens over %d rows: peak %.2f GiB above "
                        "the weights, %.2f GiB reserved for the graphs, %.2f GiB of %.2f "
                        "free left for the KV cache", self.rank, self.runner.profile_tokens,
                        min(args.max_num_seqs, self.runner.profile_tokens),
                        self.runner.profile_peak_bytes / 2**30, graphs / 2**30,
                        max(budget, 0) / 2**30, free / 2**30)
        self.num_state_snapshots = self._state_snapshots(budget, cap)
        if self.num_state_snapshots:  # prefix caching's recurrent-state snapshots share it
            budget -= self.num_state_snapshots * self._state_bytes()
        blocks = min(cap, budget // per_block) if per_block else cap
        if blocks < 1:
            if self.backend.device_type == "cpu":
                fix = (f"{budget / 2**30:.2f} GiB of the cpu KV cache budget (TESSELLM_CPU_KV_CACHE_GB, "
                       f"default {_CPU_KV_CACHE_DEFAULT >> 30}, split over the ranks) is less than "
                       f"a block ({per_block} bytes); raise TESSELLM_CPU_KV_CACHE_GB")
            else:
                mp = self.memory_profile or {}
                fix = (f"the memory profile's step ({mp.get('profile_peak', 0) / 2**30:.2f} GiB "
                       f"at max_num_batched_tokens={self.max_num_batched_tokens} over up to "
                       f"max_num_seqs={args.max_num_seqs} rows) and the decode graphs' reserve "
                       f"({mp.get('graph_estimate', 0) / 2**30:.2f} GiB) leave no block under "
                       f"gpu_memory_utilization={args.gpu_memory_utilization}; raise "
                       "gpu_memory_utilization, lower max_num_batched_tokens or max_num_seqs "
                       "(or enforce_eager: no graphs)")
            raise RuntimeError(f"No memory is left for the KV cache on {self.backend.name} "
                               f"(rank {self.rank}) after loading the model: {fix}, or use a "
                               "smaller model.")
        return int(blocks)

    def _state_bytes(self) -> int:
        from tessellm.core.mamba_state import MambaStateCache

        return MambaStateCache.bytes_per_slot(self.runner.mamba.layers, self.dtype)

    def _state_snapshots(self, budget: Optional[int], cap: int) -> int:
        """How many recurrent-state snapshots prefix caching keeps on this rank
        (core/state_prefix.py): ``recurrent_state_snapshots``, else those fitting in
        ``STATE_SNAPSHOT_SHARE`` of the KV budget (one per KV block with an explicit
        ``num_kv_blocks``), at most ``cap`` (one per block the cache could ever need). 0 without
        recurrent layers or prefix caching."""
        args = self.args
        if self.runner.mamba is None or not args.enable_prefix_caching:
            return 0
        if args.recurrent_state_snapshots is not None:
            return args.recurrent_state_snapshots
        if budget is None or not self._state_bytes():  # (a pipeline stage without such layers)
            return cap
        return max(0, min(cap, int(budget * STATE_SNAPSHOT_SHARE) // self._state_bytes()))

    def state_snapshot_slots(self) -> int:
        """The snapshots ``num_kv_blocks`` set aside memory for on this rank."""
        return self.num_state_snapshots

    def initialize_state_snapshots(self, num: int) -> None:
        """The snapshot pool of prefix caching for a recurrent-state model: ``num`` states."""
        self.runner.mamba.allocate_snapshots(num)

    def initialize_cache(self, num_blocks: int) -> bool:
        """Allocate the cache and capture graphs; True when graphs were captured."""
        self.runner.allocate_kv_cache(num_blocks, self.kv_dtype)
        self.runner.capture_graphs()
        pools = self._graph_pools()
        if self.memory_profile is not None and pools is not None:  # against the reserve
            logits = self.runner.graph_logits  # the graphs' one logits buffer, beside the pools
            took = sum(pools.values())
            self.memory_profile["graph_pool"] = took
            self.memory_profile["graph_pools"] = pools
            self.memory_profile["graph_logits"] = 0 if logits is None else logits.nbytes
            logger.info("Rank %d: the graphs' pools hold %.2f GiB (decode %.2f, verify %.2f, "
                        "draft %.2f), their logits buffer %.2f GiB (%.2f GiB reserved for the "
                        "graphs)", self.rank, took / 2**30, pools["decode"] / 2**30,
                        pools["verify"] / 2**30, pools["draft"] / 2**30,
                        self.memory_profile["graph_logits"] / 2**30,
                        self.memory_profile["graph_estimate"] / 2**30)
        return self.runner.graph_runner is not None

    def _graph_pools(self) -> Optional[dict]:
        """Bytes in each kind of captured graphs' private pools, as ``graph_memory_estimate``
        and ``draft_graph_memory_estimate`` reserve them: the decode graphs', the verify graphs'
        (a runner and pool per query length) and a drafter's own draft steps'; None where the
        graph runner reports no pool (no device graphs)."""
        decode = getattr(self.runner.graph_runner, "pool_bytes", None)
        if decode is None:
            return None
        verify = self.runner.verify_graphs
        drafter = getattr(getattr(self.runner.spec, "proposer", None), "graph_runner", None)
        return {"decode": decode,
                "verify": sum(getattr(r, "pool_bytes", 0) or 0
                              for r in (verify.runners.values() if verify is not None else ())),
                "draft": getattr(drafter, "pool_bytes", 0) or 0}

    def kv_block_bytes(self) -> int:
        """One KV block's bytes on this rank (its shard, its stage's layers)."""
        return self.runner.kv_bytes_per_block(self.kv_dtype)

    def initialize_host_cache(self, num_blocks: int) -> None:
        """The host tier of the prefix cache (``--kv-offloading-size``): ``num_blocks`` blocks
        of this rank's cache in host memory, copied through the backend's ``swap_blocks``."""
        from tessellm.backends.reference.kv_transfer import swap_blocks
        from tessellm.backends.spec import OpsSpec

        ops = get_registry().fused_ops(self.backend, OpsSpec(self.dtype))
        self.runner.swap_blocks = getattr(ops, "swap_blocks", None) or swap_blocks
        self.runner.allocate_host_kv_cache(num_blocks)

    def kv_cache_layout(self) -> list:
        """Each cache tensor's dtype and block shape on this rank, as stored (a heads-major
        cache's storage): what a KV connector's blocks must match."""
        return [[str(t.dtype).replace("torch.", ""), list(t.shape[1:])]
                for t in self.runner._block_major_caches()]

    def initialize_kv_connector(self, config: dict, context: dict) -> None:
        """A KV connector's worker half on this rank (``--kv-transfer-config``,
        tessellm/kv_transfer): this rank's block-major caches, copied through the backend's
        ``swap_blocks``; a load that fails on any tensor-parallel rank fails on all."""
        from tessellm.kv_transfer import KVConnectorContext, KVConnectorRole, make_connector
        from tessellm.kv_transfer.config import parse_kv_transfer_config

        ctx = KVConnectorContext(**{**context, "rank": self.rank})
        connector = make_connector(parse_kv_transfer_config(config), KVConnectorRole.WORKER, ctx)
        self.runner.kv_connector = connector
        self._register_kv_connector_caches()
        if self.tp.size > 1:
            self.runner.kv_load_agree = self._agree_on_failed_loads

    def _register_kv_connector_caches(self) -> None:
        """The KV connector's worker half gets this rank's cache tensors (again after sleep
        mode allocated the cache anew: the old tensors are gone)."""
        from tessellm.backends.reference.kv_transfer import swap_blocks
        from tessellm.backends.spec import OpsSpec

        ops = get_registry().fused_ops(self.backend, OpsSpec(self.dtype))
        self.runner.kv_connector.register_kv_caches(self.runner._block_major_caches(),
                                                    getattr(ops, "swap_blocks", None) or swap_blocks,
                                                    self.backend.synchronize, self.device)

    def _agree_on_failed_loads(self, request_ids: list, failed):
        """The requests whose load failed on any tensor-parallel rank (one small all-reduce,
        in steps that load); or, for ``failed`` a dict of background loads finished here
        (request id -> loaded), those finished on every rank, loaded unless one failed."""
        if isinstance(failed, dict):
            rows = [[float(r in failed), float(failed.get(r) is False)] for r in request_ids]
            sums = self.tp.all_reduce(torch.tensor(rows, device=self.device).view(-1)).view(-1, 2)
            return {r: s[1] == 0 for r, s in zip(request_ids, sums.tolist()) if s[0] == self.tp.size}
        flags = torch.tensor([float(r in failed) for r in request_ids], device=self.device)
        flags = self.tp.all_reduce(flags)
        return [r for r, f in zip(request_ids, flags.tolist()) if f > 0]

    def poll_kv_loads(self, meta: dict, wait: float) -> dict:
        """A step with nothing to compute while a KV connector loads in the background: the
        loads to start, and those of ``meta["check"]`` finished on every rank (waiting up to
        ``wait`` seconds for one)."""
        return self.runner.load_external_kv(meta, wait)[1]

    def poll_kv_saves(self, wait: float):
        """Nothing to compute while a KV connector's saves are unsettled: the saves settled
        since start (``[saved, failed, dropped]`` blocks, or None), waiting up to ``wait``
        seconds for those in flight."""
        return self.runner.settled_external_saves(wait)

    def release(self) -> None:
        """Drop the model, its KV cache and graphs, and give the device memory back to the device
        (``LLM.shutdown``: a second engine in this process can size its cache from it again)."""
        if self.runner is not None and self.runner.kv_connector is not None:
            self.runner.kv_connector.shutdown()  # its saves under way are written first
        if self.runner is not None and self.device.type != "cpu":
            self.backend.synchronize()  # copies in flight from pinned memory: done (their events)
        self.runner = None
        self.sleep_state = None
        gc.collect()  # graphs and compiled steps hold reference cycles
        if self.device.type != "cpu" and hasattr(torch, "accelerator"):
            torch.accelerator.empty_cache()  # the caching allocator's blocks: free for others
        _empty_host_cache(self.device)  # the host KV tier's pinned chunks: back to the OS

    def execute_async(self, sched: SchedulerOutput) -> StepHandle:
        """Launch the step; ``.result()`` on the handle waits for its tokens (and for the KV
        connector's saves of the step, when it has any)."""
        handle = self.runner.execute_async(sched)
        saving, self.runner.pending_save = self.runner.pending_save, None
        return handle if saving is None else SavingStep(handle, saving, self.runner)

    # -- sleep mode and weight updates (core/runner_sleep.py; every rank via collective_rpc) --

    def sleep(self, level: int) -> dict:
        """Free this rank's weights (level 1: to host memory; 2: discarded) and KV cache."""
        from tessellm.core.runner_sleep import RunnerSleep

        if getattr(self, "sleep_state", None) is None:
            self.sleep_state = RunnerSleep(self.runner)
        if self.runner.kv_connector is not None:
            self.runner.kv_connector.wait_for_save()  # its copies out of the cache are done
            self.runner.kv_connector.release_kv_caches()  # else it holds the cache's memory
        report = self.sleep_state.sleep(level, self.kv_dtype)
        gc.collect()  # released graphs hold reference cycles
        if self.device.type != "cpu" and hasattr(torch, "accelerator"):
            torch.accelerator.empty_cache()  # the freed blocks back to the device
        return dataclasses.asdict(report)

    def wake_up(self, tags: Optional[list] = None) -> None:
        state = getattr(self, "sleep_state", None)
        if state is not None:
            state.wake_up(tags)
            if self.runner.kv_connector is not None and (tags is None or "kv_cache" in tags):
                self._register_kv_connector_caches()  # the cache is new tensors now
            if self.device.type != "cpu":
                _empty_host_cache(self.device)  # the weights' pinned host copies: back to the OS

    def load_weights(self, weights) -> int:
        """Copy new values into the model's weights, in place (HF-named ``(name, tensor)``
        pairs, full tensors: each rank takes its slices). Returns how many weights were filled."""
        from tessellm.core.runner_sleep import check_weights_awake
        from tessellm.multimodal.text_only import image_text_architecture, text_weights
        from tessellm.quantization.config import resolve_quant_spec

        check_weights_awake(getattr(self, "sleep_state", None))
        if resolve_quant_spec(self.args.quantization, self.source) is not None:
            raise ValueError("load_weights does not update a quantized model yet (its weights are "
                             "repacked at load); serve the unquantized checkpoint to update weights.")
        if image_text_architecture(self.source.hf_config) is not None:
            weights = text_weights(weights)
        from tessellm.core.runner_sleep import mark_weights_changed

        with torch.inference_mode():
            loaded = self.runner.model.load_weights(iter(weights))
            mark_weights_changed([self.runner.model])
        self.backend.synchronize()
        return len(loaded)

    def load_weights_from_path(self, path: str) -> int:
        """``load_weights`` from a directory of safetensors files (each rank reads its slices)."""
        from tessellm.loader.safetensors_loader import iter_safetensors_weights

        return self.load_weights(iter_safetensors_weights(path, self.dtype, lazy=True))

    def save_sharded_state(self, path: str, pattern: Optional[str] = None,
                           max_size: Optional[int] = None) -> list[str]:
        """This rank's weights, as loaded, into its own files under ``path``
        (``loader/sharded_state.py``); returns the files written."""
        from tessellm.core.runner_sleep import check_weights_awake
        from tessellm.loader.model_loader import sharded_state_layout
        from tessellm.loader.sharded_quant import check_supported
        from tessellm.loader.sharded_state import save_sharded_state
        from tessellm.quantization.config import resolve_quant_spec

        check_weights_awake(getattr(self, "sleep_state", None))
        spec = resolve_quant_spec(self.args.quantization, self.source)
        scheme = spec.scheme if spec is not None else None
        check_supported(self.runner.model, scheme, "save")
        layout = sharded_state_layout(self.tp.size, self.pp.num_stages, self.dtype, scheme)
        return save_sharded_state(self.runner.model, path, self.rank, layout, pattern, max_size)

    # -- diagnostics (benchmarks/profile_tp.py; every rank at once through collective_rpc) ----

    def time_decode_graph(self, batch: int, iters: int = 50) -> Optional[float]:
        """GPU milliseconds of one captured decode step at ``batch`` (replays the graph; all
        ranks must replay together, their collectives meet)."""
        gr = self.runner.graph_runner
        if gr is None or self.device.type != "cuda":
            return None
        graph = gr._graphs[gr.padded_size(batch)][0]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters

    def start_profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._profiler = profile(activities=acts)
        self._profiler.__enter__()

    def stop_profile(self, row_limit: int = 25, trace_path: Optional[str] = None) -> str:
        self._profiler.__exit__(None, None, None)
        if trace_path:
            self._profiler.export_chrome_trace(trace_path.format(rank=self.rank))
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self._profiler.key_averages().table(sort_by=key, row_limit=row_limit)
        self._profiler = None
        return table


class SavingStep:
    """A launched step whose KV connector saves are under way: ``result()`` waits for its
    tokens, then for the saves (written by the connector's thread while the device runs the
    next step), so no output leaves before its blocks are saved."""

    def __init__(self, handle, saving, runner):
        self.handle = handle
        self.saving = saving
        self.runner = runner

    def result(self):
        out = self.handle.result()
        self.saving.result()
        settled = self.runner.settled_external_saves()  # the saves waited for, reported with it
        if settled:
            out.kv_saves = settled
        return out


def _pooler(config, model):
    if config is None:
        return None
    if getattr(model, "supports_images", False):
        raise ValueError(f"{type(model).__name__} takes images, and pooling (embeddings) does not "
                         "support image models yet; serve it with runner='generate'.")
    from tessellm.pooling.pooler import Pooler

    return Pooler(config, model.classify if config.task == "classify" else None)


def attention_rows(args: EngineArgs, graphs: bool = True) -> int:
    """``AttentionSpec.max_num_seqs`` of the target's kernels: the scheduler's max_num_seqs,
    or the rows of the widest captured verify step where speculative decoding has more. Only
    where verify steps may be captured (eager ones take the prefill kernel: the wider limit
    would only grow the decode workspace): ``graphs`` (the decode step may be captured:
    ``Worker._may_capture``) and a drafter that does not read the step's tensors (EAGLE, MTP:
    ``RunnerGraphs._verify_captured``). Still widened where the model turns out recurrent with
    its verify steps eager (not known before it is built)."""
    from tessellm.spec_decode.config import parse_speculative_config
    from tessellm.spec_decode.proposer import proposer_class, wants_step_tensors
    from tessellm.spec_decode.verify_graphs import max_verify_rows

    config = parse_speculative_config(args.speculative_config)
    if config is None or not graphs or wants_step_tensors(proposer_class(config.method)):
        return args.max_num_seqs
    return max(args.max_num_seqs, max_verify_rows(args.max_num_seqs, config))


def _verify_graph_factory(registry, backend, graphs, dtype):
    """Speculative decoding's verify graphs: a fresh graph runner per query length, from the
    same hook as the decode graphs (None when the decode step itself is not captured)."""
    if graphs is None:
        return None
    return lambda sizes: registry.graph_runner(backend, GraphSpec(max(sizes), False,
                                                                  capture_sizes=tuple(sizes), dtype=dtype))


def _lora_state(args: EngineArgs, model, registry, backend, hf_config, device, dtype):
    """LoRA slots on this rank's layers (``tessellm.lora.worker``), or None without LoRA."""
    from tessellm.lora.config import LoRAConfig

    config = LoRAConfig.from_args(args)
    if config is None:
        return None
    from tessellm.lora.ops import lora_ops_for
    from tessellm.lora.worker import LoRAWorkerState

    ops = lora_ops_for(registry, backend, dtype, config.max_loras, config.max_lora_rank, device)
    return LoRAWorkerState(model, ops, config, hf_config, device)


def _set_current_device(device: torch.device) -> None:
    try:
        module = torch.get_device_module(device.type)  # torch.cuda, torch.xpu, ...
    except (RuntimeError, AttributeError):  # e.g. xla: torch_xla places tensors by device
        return
    if hasattr(module, "set_device"):
        module.set_device(device)


def _empty_host_cache(device: torch.device) -> None:
    """Give the pinned host memory torch's caching host allocator keeps after its tensors are
    gone back to the OS: the host KV tier's chunks after shutdown, sleep mode's weight copies
    after a wake. A freed pinned block stays cached for reuse (and counted in
    ``host_memory_stats()["allocated_bytes"]``) until this. ``torch.accelerator.empty_host_cache``
    is torch 2.12+; older CUDA/ROCm builds (the H100 image's torch 2.11) have only
    ``torch._C._host_emptyCache`` (torch 2.5+). Nothing to do on cpu (no pinned memory)."""
    if device.type in ("cpu", "meta"):
        return
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if empty is None and device.type == "cuda":
        empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def device_index(args: EngineArgs, parallel: ParallelConfig, rank: int) -> int:
    """The device of ``rank`` on this host. Data-parallel engine cores take consecutive groups
    of ``world_size`` devices::

        data_parallel_size 2, tensor_parallel_size 2:   devices 0 1 | 2 3
                                                        core 0      | core 1
    """
    return getattr(args, "data_parallel_rank", 0) * parallel.world_size + rank


def check_device_index(backend, index: int, args: EngineArgs, parallel: ParallelConfig) -> None:
    """One clear error when this host has too few devices for every core and rank (the
    backend's device module's ``device_count``; not checked where there is none, e.g. cpu)."""
    if backend.device_type == "cpu" or backend.emulated:
        return
    try:
        count = torch.get_device_module(backend.device_type).device_count()
    except (RuntimeError, AttributeError):
        return
    dp_size = getattr(args, "data_parallel_size", 1)
    if index >= count:
        raise ValueError(f"data_parallel_size {dp_size} x tensor_parallel_size "
                         f"{parallel.tensor_parallel_size} x pipeline_parallel_size "
                         f"{parallel.pipeline_parallel_size} needs {dp_size * parallel.world_size} "
                         f"{backend.name} devices, but {count} are visible; lower one of them "
                         "(or make more devices visible).")


def set_worker_threads(device_type: str, world_size: int) -> None:
    """Host threads of a worker process, unless the user set OMP_NUM_THREADS. CPU ranks share
    the host's cores evenly (``world_size``: every rank of every data-parallel engine core). An accelerator's worker needs none for its model (its host work is
    numpy and copies), and idle OpenMP threads spinning in every rank's process steal the cores
    that prepare and launch the next step."""
    if envs.omp_threads_set():
        return
    if device_type != "cpu":
        torch.set_num_threads(1)
    elif world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def rope_positions(args, max_model_len: int) -> int:
    """Rows the rotary tables keep: the scheduler rotates positions below ``max_model_len``
    only (drafts verified included); a drafter's lookahead (its block tables are ``k`` slots
    wider) is kept as a margin of ``num_speculative_tokens`` rows."""
    from tessellm.spec_decode.config import parse_speculative_config

    spec = parse_speculative_config(args.speculative_config)
    return max_model_len + (spec.num_speculative_tokens if spec is not None else 0)


def _logits_processors(args: EngineArgs, source, max_model_len: int, dtype: torch.dtype, vocab_size: int,
                       device: torch.device):
    """The custom logits processors (given and installed), built on the sampler's device; None
    when there are none."""
    from tessellm.core.engine_surface import engine_model_config, engine_vllm_config
    from tessellm.sample.logits_processor.load import engine_classes
    from tessellm.sample.logits_processor.state import LogitsProcessors

    # the engine core checked them and warned of any skipped: quiet here (every rank asks)
    classes = engine_classes(args.logits_processors, False, args.speculative_config is not None, warn=False)
    if not classes:
        return None
    model = engine_model_config(args, source.path, max_model_len, dtype, "generate", source.hf_config,
                                vocab_size)
    config = engine_vllm_config(args, model, args.num_kv_blocks or 0)
    return LogitsProcessors(classes, config, device, device.type not in ("cpu", "xla"))
